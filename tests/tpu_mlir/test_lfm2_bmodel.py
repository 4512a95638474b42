"""LFM2 (issue #24) on the real compiler: a tiny 2-layer model (layer 0 a short convolution with its conv state,
layer 1 full attention): its four block kinds compiled F16 with the tools' compares, then the whole model BF16,
proven on the cmodel by verify --bmodel token for token against transformers."""

from __future__ import annotations

import pytest
from family_harness import TINY, assert_compiled, compile_segments_of

from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

pytestmark = pytest.mark.slow

SEQ = 16
PROMPT = [1, 45, 97, 200]
LFM2 = dict(num_hidden_layers=2, layer_types=["conv", "full_attention"], conv_L_cache=3)


def test_lfm2_compiles_f16_with_compares_and_its_bf16_bmodel_verifies(make_model, tmp_path, toolchain):
    folder = make_model("lfm2", **{**TINY, **LFM2})
    blocks = ("block_0", "block_cache_0", "block_1", "block_cache_1")  # conv prefill/decode, attention
    f16 = compile_segments_of(folder, tmp_path / "f16", toolchain, blocks, seq=SEQ)
    assert [r.segment for r in f16.results] == list(blocks)
    assert_compiled(f16)
    out = tmp_path / "out"
    export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ))
    bf16 = compile_segments(out, toolchain, CompileOptions(quantize="bf16", check="none"), jobs=2)
    report = verify(out, prompt=PROMPT, new_tokens=3, bmodel=bf16.bmodel, tpu_mlir=toolchain)
    assert report.dtype == "bmodel-bf16" and report.backend.startswith("bmodel on the cmodel")
    assert report.passed and report.tokens_equal and len(report.hf_tokens) == 3, report.to_json()
