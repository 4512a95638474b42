"""The same compile plan run by the local executor and by the Ray executor (a local cluster): their times and ratio.

    PYTHONPATH=src python scripts/compile_executors.py [--preset tiny-llama] [--seq 16] [--quantize bf16] [--jobs 2]

Exports the preset once into a temporary folder, compiles a copy with each executor (no checks: the tools only)
and prints the seconds of each, their ratio and whether the bmodels are byte-identical.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--quantize", default="bf16")
    parser.add_argument("--chip", default="bm1684x")
    parser.add_argument("--jobs", type=int, default=2, help="segments at once, for both executors")
    parser.add_argument("--ray-address", default=None, help="a running cluster (default: a local one)")
    parser.add_argument("--tpu-mlir", default=None)
    args = parser.parse_args()

    from tpugraph.compiler import CompileOptions, compile_segments
    from tpugraph.compiler.bmodel_bytes import same_bmodel
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize

    options = CompileOptions(chip=args.chip, quantize=args.quantize, check="none")
    with tempfile.TemporaryDirectory(prefix="compile_executors_") as tmp:
        base = Path(tmp) / "out"
        export_and_optimize(args.preset, base, ExportOptions(seq_length=args.seq))
        seconds, bmodels = {}, {}
        for executor in ("local", "ray"):
            out = Path(tmp) / executor
            shutil.copytree(base, out)
            t0 = time.perf_counter()
            report = compile_segments(out, args.tpu_mlir, options, jobs=args.jobs, executor=executor,
                                      ray_address=args.ray_address if executor == "ray" else None)
            seconds[executor] = time.perf_counter() - t0
            bmodels[executor] = report.bmodel
            print(f"{executor:>5}: {seconds[executor]:7.1f} s  ({len(report.plan.steps)} tool runs, "
                  f"{report.bmodel.name})", flush=True)
        print(f"ratio ray / local: {seconds['ray'] / seconds['local']:.2f}")
        same = same_bmodel(bmodels["ray"], bmodels["local"])
        print(f"bmodels byte-identical (but for their creation time): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
