"""Perplexity of a model's export and of its bmodels in several quantization modes beside transformers', on the same
windows of the built-in text (tpugraph eval), with the time each step took: the table of docs/guides/evaluation.md.

    heavy env PYTHONPATH=src .venv/bin/python scripts/eval_quant_table.py --model $TPUGRAPH_SMOLLM2 --work /tmp/evq

Exports MODEL once (float32, --seq-length SEQ), scores the ONNX segments in onnxruntime, then for each mode compiles
a bmodel with the evaluation head (compile --eval-head --no-check) and scores it on the cmodel; each bmodel and its
compile folder are deleted once scored, and the whole work folder at the end unless --keep. Prints a Markdown table
and writes it with the raw figures to WORK/../eval_quant_table.json (or --json-out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

MODES = ("bf16", "w8bf16", "w4bf16:64", "w4bf16:128")


def parse_mode(text: str) -> tuple[str, int | None]:
    quantize, _, group = text.partition(":")
    return quantize, int(group) if group else None


def markdown_table(rows: list[dict], export_seconds: float) -> str:
    """The rows as docs/guides/evaluation.md shows them."""
    lines = ["| system | bmodel | perplexity | transformers | difference | top-1 agreement | compile | "
             "eval + transformers |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        size = f"{r['bmodel_bytes'] / 1e6:.0f} MB" if r.get("bmodel_bytes") else "-"
        compile_time = (f"{r['compile_seconds']:.0f} s" if r["compile_seconds"] is not None
                        else f"export {export_seconds:.0f} s")
        agree = f"{100 * r['top1_agreement']:.1f}% ({round(r['top1_agreement'] * r['positions'])}/{r['positions']})"
        lines.append(f"| {r['system']} | {size} | {r['perplexity']:.3f} | {r['reference_perplexity']:.3f} | "
                     f"{100 * r['relative_difference']:+.3f}% | {agree} | {compile_time} | "
                     f"{r['backend_seconds']:.0f} s + {r['reference_seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("TPUGRAPH_SMOLLM2"), help="model folder ($TPUGRAPH_SMOLLM2)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (the export and bmodels)")
    parser.add_argument("--seq", type=int, default=64, help="SEQ of the export; windows are this long")
    parser.add_argument("--windows", type=int, default=1, help="windows of the built-in text to score")
    parser.add_argument("--modes", default=",".join(MODES), help="quantize[:group] list, e.g. bf16,w4bf16:128")
    parser.add_argument("--tpu-mlir", default=os.environ.get("TPUGRAPH_TPU_MLIR_VENV"))
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model (or $TPUGRAPH_SMOLLM2) is required")

    import tpugraph
    from tpugraph.compiler.options import CompileOptions
    from tpugraph.proof.perplexity import evaluate

    out = args.work / "out"
    rows = []
    t0 = time.perf_counter()
    tpugraph.export_and_optimize(args.model, out, tpugraph.ExportOptions(seq_length=args.seq, force=True))
    export_seconds = time.perf_counter() - t0
    print(f"exported in {export_seconds:.0f}s", file=sys.stderr, flush=True)
    report = evaluate(out, builtin=True, windows=args.windows)
    rows.append({"system": "ONNX float32, onnxruntime", "mode": "float32", "compile_seconds": None,
                 **report.to_json()})
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for text in args.modes.split(","):
        quantize, group = parse_mode(text)
        options = CompileOptions(quantize=quantize, q_group_size=group, check="none", eval_head=True)
        t0 = time.perf_counter()
        compiled = tpugraph.compile(out, args.tpu_mlir, options)
        compile_seconds = time.perf_counter() - t0
        report = evaluate(out, builtin=True, windows=args.windows, bmodel=compiled.bmodel, tpu_mlir=args.tpu_mlir)
        size = compiled.bmodel.stat().st_size
        label = quantize.upper() + (f" g{group}" if group else "")
        rows.append({"system": f"bmodel {label}, cmodel", "mode": text, "compile_seconds": compile_seconds,
                     "bmodel_bytes": size, **report.to_json()})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        compiled.bmodel.unlink(missing_ok=True)
        shutil.rmtree(out / compiled.plan.work_dir, ignore_errors=True)
    table = markdown_table(rows, export_seconds)
    print(table)
    target = args.json_out or args.work.parent / "eval_quant_table.json"
    target.write_text(json.dumps({"model": args.model, "seq": args.seq, "windows": args.windows,
                                  "export_seconds": export_seconds, "rows": rows, "table": table}, indent=1))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
