"""What running onnxsim in a child process (tpugraph.onnxsim_process) costs against calling it in-process.

Exports MODEL with no pass (the graphs the simplify pass sees, weights inline), then in one invocation:
  - startup: a child's start until it answers (it imports onnx + onnxsim) vs ``import onnxsim`` here;
  - per call: onnxsim.simplify on every segment, ROUNDS times, in-process vs through the child
    (serialise, pipe, parse both ways).
Prints the times and the ratios child/in-process.

    PYTHONPATH=src python scripts/bench_onnxsim_child.py [--model tiny-llama] [--rounds 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import onnx

    from tpugraph.export.pipeline import ExportOptions, export_and_optimize
    from tpugraph.passes import onnxsim_process

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        manifest = export_and_optimize(args.model, out, ExportOptions(seq_length=args.seq_length, passes=["none"]))
        models = [onnx.load(str(out / e.file)) for e in manifest.segments]
    kwargs = {"check_n": 0, "skip_fuse_bn": False, "skipped_optimizers": None, "skip_constant_folding": False,
              "tensor_size_threshold": "16MB"}

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import onnx, onnxsim"], check=True)
    import_in_fresh_process = time.perf_counter() - t0
    t0 = time.perf_counter()
    import onnxsim
    import_here = time.perf_counter() - t0
    t0 = time.perf_counter()
    child = onnxsim_process.OnnxsimProcess()  # a fresh child (the export above started one already)
    child.call({"op": "version"})
    child_start = time.perf_counter() - t0
    child.close()

    in_process = through_child = 0.0
    for _ in range(args.rounds):
        for model in models:
            t0 = time.perf_counter()
            onnxsim.simplify(model, certify=False, **kwargs)
            in_process += time.perf_counter() - t0
            t0 = time.perf_counter()
            onnxsim_process.simplify(model.SerializeToString(), kwargs)
            through_child += time.perf_counter() - t0
    calls = args.rounds * len(models)
    print(f"{args.model}, {len(models)} segments x {args.rounds} rounds = {calls} simplify calls")
    print(f"startup: child answering {child_start:.2f}s; 'import onnxsim' here {import_here:.2f}s "
          f"(a fresh interpreter importing onnx+onnxsim: {import_in_fresh_process:.2f}s)")
    print(f"per call: in-process {1000 * in_process / calls:.1f} ms, through the child "
          f"{1000 * through_child / calls:.1f} ms (ratio {through_child / in_process:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
