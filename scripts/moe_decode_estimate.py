#!/usr/bin/env python3
"""tpu-mlir's own estimate of one decode layer (block_cache_0): mixture of experts vs the same model dense.

Builds one-layer random-weight models of one shape (default: Qwen3-30B-A3B's layer scaled down to fit this
machine, E/k kept), exports each one's block_cache_0, compiles it F16 for the chip with model_transform and
model_deploy (no compares: the family tests do those) and reads the compiler's estimate, the sum of the
"runtime: X ms" lines of compiler_profile_0.txt. Variants, all in this one invocation:

  moe-gather  the exported MoE decode block: the router's k experts gathered by index (tpugraph's default)
  moe-all     the same layer computing every expert, weighted by the routing (the prefill design, at 1 token)
  dense-active  Qwen3 dense with intermediate = k * moe_intermediate (the same active parameters)
  dense-total   Qwen3 dense with intermediate = E * moe_intermediate (the same total parameters)

Usage: moe_decode_estimate.py [--hidden 1024] [--moe-intermediate 384] [--experts 64] [--top-k 8]
                              [--seq 256] [--chip bm1684x] [--tpu-mlir VENV] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(folder: Path, model_type: str, **config) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **config)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def export_decode_block(model_dir: Path, out: Path, seq: int, rewrites: tuple[str, ...] | None) -> Path:
    """block_cache_0 of the model as one ONNX file (weights beside it); ``rewrites`` replaces the family's."""
    import onnx

    from tpugraph.contract.segments import ContractDims, segment_specs
    from tpugraph.export.exporter import ModelParts, export_segment
    from tpugraph.source.checkpoint import WeightStore, load_config, model_facts, resolve_model

    source = resolve_model(str(model_dir))
    config, family = load_config(source)
    if rewrites is not None:
        family = dataclasses.replace(family, layer_rewrites=rewrites)
    facts = model_facts(config, family)
    dims = ContractDims(seq=seq, hidden=facts.hidden_size, kv_heads=facts.num_kv_heads, head_dim=facts.head_dim,
                        vocab=facts.vocab_size, layers=facts.num_layers)
    spec = next(s for s in segment_specs(dims) if s.name == "block_cache_0")
    model = export_segment(ModelParts(config, family, WeightStore(source.path)), spec, seq, "int32")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "block_cache_0.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="block_cache_0.onnx.data")
    return path


def compile_estimate(onnx_path: Path, venv: Path, chip: str) -> float:
    """model_transform + model_deploy (F16, io_alone like the runtime's decode blocks) -> estimated ms."""
    from tpugraph.compiler import CompileOptions, deploy_flags, tool_environment

    env = tool_environment(venv)
    cwd = onnx_path.parent
    steps = [["model_transform.py", "--model_name", "block_cache_0", "--model_def", str(onnx_path),
              "--mlir", "block_cache_0.mlir"],
             ["model_deploy.py", "--mlir", "block_cache_0.mlir",
              *deploy_flags("block_cache", CompileOptions(chip=chip, quantize="f16")), "--model", "block_cache_0.bmodel"]]
    for argv in steps:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise SystemExit(f"error: {argv[0]} failed on {onnx_path}:\n{tail}")
    profile = (cwd / "compiler_profile_0.txt").read_text()
    return sum(float(ms) for ms in re.findall(r"runtime: ([0-9.]+)ms", profile))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--moe-intermediate", type=int, default=384)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chip", default="bm1684x")
    ap.add_argument("--tpu-mlir", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--variants", default="moe-gather,moe-all,dense-active,dense-total",
                    help="comma-separated subset to run (ratios need dense-active)")
    args = ap.parse_args()

    from tpugraph.compiler import check_toolchain

    venv = check_toolchain(args.tpu_mlir)
    work = args.work or Path(tempfile.mkdtemp(prefix="moe-estimate-"))
    common = dict(vocab_size=256, hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, head_dim=args.head_dim, max_position_embeddings=4 * args.seq)
    moe = build(work / "moe", "qwen3_moe", moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
                num_experts_per_tok=args.top_k, **common)
    variants = {
        "moe-gather": (moe, None),
        "moe-all": (moe, ("sparse_moe_all",)),
        "dense-active": (lambda: build(work / "dense-active", "qwen3",
                                       intermediate_size=args.top_k * args.moe_intermediate, **common), None),
        "dense-total": (lambda: build(work / "dense-total", "qwen3",
                                      intermediate_size=args.experts * args.moe_intermediate, **common), None),
    }
    results = {}
    wanted = args.variants.split(",")
    for name, (model_dir, rewrites) in variants.items():
        if name not in wanted:
            continue
        start = time.time()
        model_dir = model_dir() if callable(model_dir) else model_dir
        path = export_decode_block(model_dir, work / f"out-{name}", args.seq, rewrites)
        results[name] = {"runtime_ms": compile_estimate(path, venv, args.chip), "seconds": round(time.time() - start, 1)}
        print(f"{name:13s} {results[name]['runtime_ms']:.4f} ms  ({results[name]['seconds']} s to export and compile)",
              flush=True)
    base = results.get("dense-active", next(iter(results.values())))["runtime_ms"]
    print(f"shape: hidden {args.hidden}, {args.experts} experts x {args.moe_intermediate}, top-{args.top_k}, "
          f"SEQ {args.seq}, {args.chip} F16; ratios to {'dense-active' if 'dense-active' in results else wanted[0]}:")
    for name, r in results.items():
        print(f"  {name:13s} {r['runtime_ms'] / base:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
