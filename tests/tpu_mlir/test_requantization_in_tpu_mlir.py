"""quant_fidelity's simulation of tpu-mlir's W4 re-quantization against the compiler itself: a block of a
tiny GPTQ checkpoint deployed W4F16 with groups of 32 holds exactly the integers, scales and zero points
the simulation computes from the same float weights.

Needs the tpu-mlir venv (scripts/setup_tpu_mlir.sh; $TPUGRAPH_TPU_MLIR_VENV); skipped with the reason
when it is absent."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from quant_checkpoints import Variant, write_quantized

from tpugraph.compiler.quant_fidelity import tpu_mlir_quantize
from tpugraph.export.pipeline import ExportOptions, export_and_optimize

pytestmark = pytest.mark.slow


def _venv() -> Path:
    venv = Path(os.environ.get("TPUGRAPH_TPU_MLIR_VENV")
                or Path.home() / ".cache" / "tpugraph" / "tpu-mlir-venv")
    if not (venv / "bin" / "model_deploy.py").exists():
        pytest.skip(f"tpu-mlir toolchain not found at {venv}: run scripts/setup_tpu_mlir.sh or set "
                    "TPUGRAPH_TPU_MLIR_VENV")
    return venv


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_compiler_integers_equal_the_simulation(tmp_path, symmetric):
    venv = _venv()
    folder, _ = write_quantized(tmp_path / "m", Variant("gptq", 4, 32, sym=False),
                                hidden_size=128, intermediate_size=256)
    out = tmp_path / "out"
    export_and_optimize(str(folder), out, ExportOptions(seq_length=16))
    deploy = (f"model_deploy.py --mlir block_0.mlir --quantize W4F16 --q_group_size 32 --chip bm1684x "
              f"--model block_0.bmodel {'--q_symmetric' if symmetric else ''}")
    script = (f"source {venv}/bin/activate && model_transform.py --model_name block_0 --model_def "
              f"{out}/block_0.onnx --mlir block_0.mlir && {deploy}")
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    top = np.load(tmp_path / "block_0_top_f32_all_weight.npz")
    deployed = np.load(next(tmp_path.glob("block_0_tpu_addressed_bm1684x_w4f16_weight.npz")))
    compared = 0
    for name in deployed.files:
        if not name.endswith("_MatMul_uint"):
            continue
        base = name[: -len("_uint")]
        # The matching float weight: the top-level [in, out] matrix whose 4-bit packing has this size.
        packed = deployed[name]
        candidates = [k for k in top.files if top[k].ndim == 2 and top[k].size == packed.size * 2]
        matches = []
        for key in candidates:
            w = top[key].T.astype(np.float32)  # [out, in]
            q, scale, zp = tpu_mlir_quantize(w, 4, 32, symmetric)
            ours = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1)
            if np.array_equal(ours, packed):
                matches.append((scale, zp))
        assert matches, f"{name}: no float weight of the block re-quantizes to the compiler's integers"
        scale, zp = matches[0]
        halves = scale.astype(np.float16).view(np.uint16).reshape(-1)
        assert np.array_equal(np.sort(deployed[f"{base}_reordered"]), np.sort(halves)), name
        if not symmetric:
            assert np.array_equal(np.sort(deployed[f"{base}_1_reordered"]), np.sort(zp.reshape(-1))), name
        compared += 1
    assert compared >= 4, deployed.files  # q, o, gate, up, down at least (small k/v may stay F16)
