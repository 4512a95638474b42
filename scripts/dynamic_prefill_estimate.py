#!/usr/bin/env python3
"""tpu-mlir's estimate of one prefill block (block_0) for a short prompt: static net vs compile --dynamic.

A static prefill net always computes its L rows, whatever the prompt; a net compiled --dynamic runs at the prompt's
n rows. model_deploy writes the compiler's estimate of a net's time on the chip ("runtime: X ms" in
compiler_profile_0.txt) for static nets only: for a --dynamic net the file stays empty (tpu-mlir 1.30.2). So the
dynamic net's time at n rows is estimated by the same block compiled static at n rows (the kernels the dynamic net
runs at that shape; the chip's on-line shape computation of a dynamic net is not in it). This script, in one
invocation: exports MODEL with --max-input-length L and with each short length n, compiles block_0 of each (BF16 by
default, no compares), checks that block_0 compiled --dynamic has no estimate of its own, and prints

    static net (L rows, any prompt)   X ms
    dynamic net at n rows             Y ms   (X/Y faster)

Usage: dynamic_prefill_estimate.py MODEL [--seq 512] [--max-input-length L] [--lengths 16,64] [--quantize bf16]
                                   [--chip bm1684x] [--tpu-mlir VENV] [--work DIR] [--json FILE]
MODEL: a preset (tiny-llama) or a Hugging Face folder (e.g. ~/.cache/tpugraph/smollm2).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path


def block_estimate(model: str, work: Path, seq: int, length: int, options, venv: Path) -> tuple[float | None, float]:
    """Export MODEL with prefill length ``length``, compile its block_0 with ``options``: (estimated ms or None
    when the profile has none, seconds taken)."""
    from tpugraph.compiler.plan import TRANSFORM_DRIVER, plan_compile
    from tpugraph.compiler.runner import run_step
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize
    from tpugraph.tpu_mlir.guest import guest_script
    from tpugraph.tpu_mlir.toolchain import tool_environment

    start = time.time()
    out = work / f"out-L{length}"
    if not (out / "manifest.json").is_file():
        export_and_optimize(model, out, ExportOptions(seq_length=seq, max_input_length=length))
    plan = plan_compile(out, options)
    driver = guest_script(TRANSFORM_DRIVER)
    (out / plan.work_dir).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(driver, out / plan.work_dir / TRANSFORM_DRIVER)
    env = tool_environment(venv)
    for step in plan.steps:
        if step.segment != "block_0":
            continue
        rc, text, log_path = run_step(step, out, env)
        if rc != 0:
            tail = "\n".join(text.splitlines()[-15:])
            raise SystemExit(f"error: {step.action} of block_0 (L={length}) failed, see {log_path}:\n{tail}")
    profile = (out / plan.work_dir / "block_0" / "compiler_profile_0.txt").read_text()
    times = [float(ms) for ms in re.findall(r"runtime: ([0-9.]+)ms", profile)]
    return (sum(times) if times else None), time.time() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--max-input-length", type=int, default=None, help="L of the static net (default SEQ)")
    ap.add_argument("--lengths", default="16", help="comma-separated short prompt lengths n")
    ap.add_argument("--quantize", default="bf16")
    ap.add_argument("--chip", default="bm1684x")
    ap.add_argument("--tpu-mlir", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from tpugraph.compiler import CompileOptions, check_toolchain

    venv = check_toolchain(args.tpu_mlir)
    work = args.work or Path(tempfile.mkdtemp(prefix="dynamic-prefill-estimate-"))
    full = args.max_input_length or args.seq
    lengths = [int(n) for n in args.lengths.split(",")]
    static = CompileOptions(chip=args.chip, quantize=args.quantize, check="none")
    dynamic = CompileOptions(chip=args.chip, quantize=args.quantize, check="none", dynamic=True)

    static_ms, secs = block_estimate(args.model, work, args.seq, full, static, venv)
    dynamic_ms, _ = block_estimate(args.model, work, args.seq, full, dynamic, venv)
    if static_ms is None:
        raise SystemExit("error: model_deploy wrote no estimate for the static block_0")
    results = {"static": {"rows": full, "runtime_ms": static_ms},
               "dynamic_own_estimate_ms": dynamic_ms,  # None: tpu-mlir writes none for a --dynamic net
               "dynamic_at": {}}
    print(f"model {args.model}, SEQ {args.seq}, {args.quantize} {args.chip}; block_0, compiler's estimate per block:")
    print(f"  static net ({full} rows, any prompt)  {static_ms:.4f} ms")
    print(f"  block_0 compiled --dynamic: its own profile gives "
          f"{'no estimate' if dynamic_ms is None else f'{dynamic_ms:.4f} ms'}")
    for n in lengths:
        ms, _ = block_estimate(args.model, work, args.seq, n, static, venv)
        results["dynamic_at"][n] = ms
        print(f"  dynamic net at {n} rows (block_0 compiled at {n})  {ms:.4f} ms  "
              f"({static_ms / ms:.2f}x faster than the static net)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
