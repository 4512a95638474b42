"""tpu-mlir's own tensor-parallel split of tpugraph's blocks (docs/explanation/tensor-parallel.md): a Llama built in
code, wide enough for tpu-mlir's MLP pattern (its down projection over 4M elements) and one layer deep, exported
with --num-device N and compiled --num-device N. The compile report measures the split from the bmodel (each
device holds about 1/N of each block's weights), and every device's parts, run on the cmodel one at a time and
chained as the cascade net chains them, equal the whole block in onnxruntime (the compile's own check). N = 2 by default; N = 4 with
TPUGRAPH_ALL_FAMILY_COMPILES=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import build_model_dir
from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.export.pipeline import ExportOptions, export_and_optimize

pytestmark = pytest.mark.slow

SEQ = 16
ALL = os.environ.get("TPUGRAPH_ALL_FAMILY_COMPILES") == "1"
# 512 x 8200 = 4.2M elements in down_proj: just over tpu-mlir's WEIGHT_LIMIT (0x400000), so the MLP splits too
WIDE = dict(vocab_size=256, hidden_size=512, intermediate_size=8200, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("wide") / "model", "llama", **WIDE)


def _whole_weight_bytes(onnx_path: Path) -> int:
    """The block's float weights at 2 bytes each (BF16), counted from its ONNX initializers."""
    import math

    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return 2 * sum(math.prod(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


@pytest.mark.parametrize("num_device", [2, pytest.param(4, id="4")])
def test_tpu_mlir_splits_the_blocks_and_each_device_part_runs(wide_model, tmp_path, toolchain, num_device):
    if num_device != 2 and not ALL:
        pytest.skip("set TPUGRAPH_ALL_FAMILY_COMPILES=1 to compile and prove the 4-device split too (about a minute)")
    out = tmp_path / "out"
    export_and_optimize(str(wide_model), out, ExportOptions(seq_length=SEQ, num_device=num_device))
    # the default check: with N devices, the per-device proof of the split takes the end-to-end check's place
    report = compile_segments(out, toolchain, CompileOptions("bm1684x", "bf16", num_device=num_device), jobs=2)
    splits = {s.segment: s for s in report.device_splits}
    for name in ("block_0", "block_cache_0"):
        split = splits[name]
        assert split.split and split.well_formed, split.line()
        whole = _whole_weight_bytes(out / f"{name}.onnx")
        for held in split.device_weight_bytes:  # about 1/N: the norms and rotary tables are on every device
            assert whole / num_device <= held < 1.03 * whole / num_device, (held, whole)
    assert not splits["embedding"].split  # its Gather pattern is off in tpu-mlir: whole on every device
    proof = report.device_proof
    assert proof is not None and proof.passed and report.passed, proof and proof.to_json()
    assert {c.segment for c in proof.checks} == {"block_0", "block_cache_0"}
    assert len(proof.nets_run) >= 2 * 2 * num_device  # attention and MLP parts of every device, both blocks
