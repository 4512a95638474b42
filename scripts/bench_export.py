#!/usr/bin/env python3
"""Benchmark: tpugraph export-and-optimize vs the naive per-segment recipe, same model, same invocation.

The naive baseline is what the per-model export_onnx.py scripts do: load the whole model in fp32, wrap
each segment, torch.onnx.export it, then run onnxsim on each file. Each side runs in its own child
process, so its peak RSS is its own. Prints wall seconds (of the whole child process, and of the export
alone: both children import torch, onnx, onnxsim and transformers before their clock starts), peak RSS
and bytes written, and the ratios.

Usage: bench_export.py MODEL_DIR [--seq-length 512] [--work DIR] [--skip-baseline] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_BASELINE = r'''
import json, os, resource, sys, time, warnings
from pathlib import Path
import torch, onnx, onnxsim
from transformers import AutoModelForCausalLM
from tpugraph.contract import ContractDims, SegmentKind, segment_specs
from tpugraph.export.exporter import _example_inputs
from tpugraph.export.wrappers import (BlockCacheSegment, BlockSegment, EmbeddingSegment, GreedyHeadSegment,
                                      LmHeadSegment, RotaryTable)
warnings.simplefilter("ignore")
model_dir, out, seq = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
c = model.config
hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
dims = ContractDims(seq=seq, hidden=c.hidden_size, kv_heads=c.num_key_value_heads, head_dim=hd,
                    vocab=c.vocab_size, layers=c.num_hidden_layers)
rotary = RotaryTable.from_hf(model.model.rotary_emb, seq)
out.mkdir(parents=True, exist_ok=True)
for spec in segment_specs(dims):
    if spec.kind in (SegmentKind.EMBEDDING, SegmentKind.EMBEDDING_CACHE):
        mod = EmbeddingSegment(model.model.embed_tokens)
    elif spec.kind == SegmentKind.BLOCK:
        mod = BlockSegment(model.model.layers[spec.layer], rotary)
    elif spec.kind == SegmentKind.BLOCK_CACHE:
        mod = BlockCacheSegment(model.model.layers[spec.layer], rotary)
    elif spec.kind == SegmentKind.LM_HEAD:
        mod = LmHeadSegment(model.model.norm, model.lm_head)
    else:
        mod = GreedyHeadSegment()
    path = out / spec.filename
    with torch.no_grad():
        torch.onnx.export(mod, _example_inputs(spec, seq), str(path), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], opset_version=15, dynamo=False)
    m = onnx.load(str(path))
    simplified, ok = onnxsim.simplify(m, check_n=0)
    onnx.save_model(simplified, str(path))
    del m, simplified
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''

CHILD_TPUGRAPH = r'''
import json, resource, sys, time, logging
import torch, onnx, onnxsim  # the libraries the baseline imports before its clock starts
from transformers import AutoModelForCausalLM
from tpugraph.pipeline import ExportOptions, export_and_optimize
t0 = time.perf_counter()
export_and_optimize(sys.argv[1], sys.argv[2], ExportOptions(seq_length=int(sys.argv[3])))
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_child(code: str, *args: str) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"child failed with exit code {r.returncode}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model folder (see scripts/make_random_model.py)")
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--work", type=Path, default=None, help="where to write both outputs (default: a temp dir)")
    ap.add_argument("--skip-baseline", action="store_true", help="run tpugraph only (e.g. a 7B model)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="tpugraph-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = [("tpugraph", CHILD_TPUGRAPH, "tpugraph")]
    if not args.skip_baseline:
        runs.insert(0, ("naive baseline", CHILD_BASELINE, "baseline"))
    rows = {}
    for name, code, folder in runs:
        out = work / folder
        shutil.rmtree(out, ignore_errors=True)
        rows[name] = run_child(code, args.model, str(out), str(args.seq_length))
        rows[name]["bytes"] = dir_bytes(out)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    print(f"model: {args.model}  SEQ={args.seq_length}  machine: {machine}")
    print("| run | wall s (process) | export s (after imports) | peak RSS GB | written GB |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall']:.1f} | {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} | {r['bytes'] / 1e9:.2f} |")
    if "naive baseline" in rows:
        b, t = rows["naive baseline"], rows["tpugraph"]
        print(f"| ratio (baseline / tpugraph) | {b['wall'] / t['wall']:.1f}x faster | "
              f"{b['seconds'] / t['seconds']:.1f}x faster | "
              f"{b['peak_rss'] / t['peak_rss']:.1f}x less | {t['bytes'] / b['bytes']:.2f}x the bytes |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "seq_length": args.seq_length, "machine": machine,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
