"""The same compile plan run by the local executor and by the Ray executor (a local cluster): their times and ratio.

    PYTHONPATH=src python scripts/compile_executors.py [--preset tiny-llama] [--seq 16] [--quantize bf16] [--jobs 2]

Exports the preset once into a temporary folder, compiles a copy with each executor (no checks: the tools only)
and prints the seconds of each, their ratio and whether the bmodels are byte-identical. The local executor runs
twice: with its fork server of warm tpu-mlir interpreters (the default) and with a fresh interpreter per tool, as
a Ray task runs it. Without --ray-address the script starts the local cluster itself (--jobs CPUs) before the
clock starts and prints its start-up apart, so the ray figure is the compile on a running cluster.
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
        if args.ray_address is None:
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=args.jobs, include_dashboard=False, log_to_driver=False)
            print(f"ray local cluster start: {time.perf_counter() - t0:.1f} s ({args.jobs} CPUs)", flush=True)
        # local: tpu-mlir's Python tools forked from one warm server (the default); local-fresh: a new interpreter
        # per tool, as each Ray task starts one, which tells the executor's own overhead from the fork server's gain
        for run, executor, tool_worker in (("local", "local", True), ("local-fresh", "local", False),
                                           ("ray", "ray", False)):
            out = Path(tmp) / run
            shutil.copytree(base, out)
            t0 = time.perf_counter()
            report = compile_segments(out, args.tpu_mlir, options, jobs=args.jobs, executor=executor,
                                      tool_worker=tool_worker,
                                      ray_address=args.ray_address if executor == "ray" else None)
            seconds[run] = time.perf_counter() - t0
            bmodels[run] = report.bmodel
            print(f"{run:>11}: {seconds[run]:7.1f} s  ({len(report.plan.steps)} tool runs, "
                  f"{report.bmodel.name})", flush=True)
        print(f"ratio ray / local: {seconds['ray'] / seconds['local']:.2f}; "
              f"ray / local-fresh: {seconds['ray'] / seconds['local-fresh']:.2f}")
        same = same_bmodel(bmodels["ray"], bmodels["local"]) and same_bmodel(bmodels["local-fresh"], bmodels["local"])
        print(f"bmodels byte-identical (but for their creation time): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
