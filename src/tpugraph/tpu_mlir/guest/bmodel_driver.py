"""Runs a combined bmodel on tpu-mlir's cmodel chip simulator for tpugraph, over a pipe (see wire.py).

Started by tpugraph as ``TPU_MLIR_VENV/bin/python bmodel_driver.py BMODEL``: this file runs inside the tpu-mlir
venv (Python 3.10, its pyruntime_bm binding), never inside tpugraph's own. Requests on stdin, replies on the
original stdout; everything the runtime prints goes to stderr. Requests:
  {"op": "nets"}                    -> {"chip", "nets": {name: {"inputs": [...], "outputs": [...], "dynamic": bool}}}
                                       ("dynamic": compiled --dynamic, as `model_tool --info` tells)
  {"op": "run", "net": NAME[, "dynamic": true]} + arrays in the net's input order (float32 / int32)
                                    -> the net's outputs (floats as float32, integers as they are); with
                                       "dynamic" the arrays may be smaller than the net's shapes (a net compiled
                                       --dynamic runs at their shapes: forward_dynamic)
  {"op": "quit"}
An error is a reply {"error": "one line"}. A board's runtime would be another driver answering the same three
requests (for instance with sophon's own Python binding on the board).
"""

import os
import sys

REEXEC_MARK = "TPUGRAPH_BMODEL_DRIVER_ENV"


def _environment() -> None:
    """``import tpu_mlir`` sets TPUC_ROOT, LD_LIBRARY_PATH and PYTHONPATH; the loader only sees them after exec."""
    # (this file's folder is sys.path[0]: no module in it may share a name with the standard library)
    import tpu_mlir  # noqa: F401

    if os.environ.get(REEXEC_MARK) != "1":
        os.environ[REEXEC_MARK] = "1"
        os.execv(sys.executable, [sys.executable, *sys.argv])


TPUV7_CHIPS = ("BM1690", "BM1690E", "SG2262")


def _load(bmodel: str):
    import importlib
    import re
    import subprocess

    from filelock import FileLock
    from tpu_mlir.python.tools import model_runner

    chip = subprocess.run(["model_tool", "--chip", bmodel], capture_output=True, text=True).stdout.strip()
    if not chip:
        raise RuntimeError(f"model_tool cannot read {bmodel}: not a bmodel")
    kernel_mode = subprocess.run(["model_tool", "--kernel_mode", bmodel], capture_output=True, text=True).stdout
    rvti = kernel_mode.strip() == "1"
    info = subprocess.run(["model_tool", "--info", bmodel], capture_output=True, text=True).stdout
    dynamic = {m.group(1) for m in re.finditer(r"^net \d+: \[([^\]]+)\]\s+dynamic\s*$", info, re.MULTILINE)}
    # The cmodel library is picked by a symlink in the wheel: switch it under tpu-mlir's own lock.
    with FileLock("/tmp/cmodel_so.lock"):
        model_runner.link_cmodel_so(chip, rvti)
        model_runner.link_bmlib_so(chip)
        # BM1690's runtime is tpuv7's (tools/model_runner.py picks it the same way); the others are bmruntime's
        runtime = importlib.import_module("pyruntime_tpuv7" if chip.upper() in TPUV7_CHIPS else "pyruntime_bm")
        model_runner.bind_cmodel_so(chip, rvti)
    return chip, runtime.Model(bmodel, 0, ""), dynamic


def _tensor_info(t) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.data.shape)}


def main() -> int:
    _environment()
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import wire
    from tpu_mlir.python.utils.lowering import bf16_to_fp32, lowering

    # The protocol owns the original stdout; the runtime's own prints (C and Python) go to stderr.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    try:
        chip, model, dynamic_nets = _load(sys.argv[1])
    except Exception as exc:  # reported to tpugraph as one line, which it turns into its error
        wire.write_message(replies, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
        return 1
    nets = {}
    while True:
        try:
            header, arrays = wire.read_message(requests)
        except EOFError:
            return 0
        op = header.get("op")
        try:
            if op == "quit":
                wire.write_message(replies, {"ok": True})
                return 0
            if op == "nets":
                info = {}
                for name in model.networks:
                    net = model.Net(name)
                    info[name] = {"inputs": [_tensor_info(t) for t in net.inputs],
                                  "outputs": [_tensor_info(t) for t in net.outputs],
                                  "dynamic": name in dynamic_nets}
                wire.write_message(replies, {"chip": chip, "nets": info})
                continue
            if op != "run":
                raise ValueError(f"unknown request {op!r}")
            name = header["net"]
            if name not in nets:
                nets[name] = model.Net(name)
            net = nets[name]
            if len(arrays) != len(net.inputs):
                raise ValueError(f"net {name} takes {len(net.inputs)} inputs, got {len(arrays)}")
            # "dynamic": inputs may be smaller than the net's (max) shapes: forward_dynamic at their shapes
            dynamic = bool(header.get("dynamic"))
            for t, x in zip(net.inputs, arrays):
                if x.size != t.data.size and not (dynamic and x.ndim == t.data.ndim and x.size <= t.data.size):
                    raise ValueError(f"net {name} input {t.name}: {t.data.shape} expected, got {x.shape}")
                t.data.reshape(-1)[:x.size] = lowering(x, pdtype=t.dtype, pshape=x.shape, pzero_point=t.qzero_point,
                                                       pscale=t.qscale).reshape(-1)
            # tpuv7's runtime (BM1690) computes only through forward_dynamic: its forward() leaves the outputs
            # unwritten (measured with tpu-mlir 1.30.2); tools/model_runner.py runs every bmodel that way
            if dynamic or chip.upper() in TPUV7_CHIPS:
                shapes = net.forward_dynamic([list(x.shape) for x in arrays])
            else:
                net.forward()
                shapes = [list(t.data.shape) for t in net.outputs]
            outputs = []
            for t, shape in zip(net.outputs, shapes):
                if t.dtype == "bf16":
                    out = np.asarray(bf16_to_fp32(t.data), dtype=np.float32)
                elif t.dtype in ("f16", "f32", "u16"):
                    out = np.array(t.data, dtype=np.float32)
                else:
                    out = np.array(t.data)
                size = int(np.prod(shape))
                outputs.append(out.reshape(-1)[:size].reshape([int(d) for d in shape]))
            wire.write_message(replies, {"ok": True}, outputs)
        except Exception as exc:
            wire.write_message(replies, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})


if __name__ == "__main__":
    sys.exit(main())
