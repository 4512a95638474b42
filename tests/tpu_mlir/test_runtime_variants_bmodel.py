"""The LLM-TPU runtime variant (no embedding nets: embedding.bin on disk; a top-k lm_head) compiled BF16 and driven
on the cmodel by verify --bmodel."""

from __future__ import annotations

import pytest

from tpugraph.contract.embedding_table import COMPILED_NAME
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

SEQ = 16
PROMPT = [1, 45, 97, 200]


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    out = tmp_path_factory.mktemp("variant") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ, lm_head_topk=True, embedding_disk=True))
    return out


@pytest.mark.slow
def test_bmodel_of_the_variant_on_the_cmodel(variant, toolchain):
    venv = toolchain
    """Compiled BF16 (no embedding nets, top-k lm_head): compile writes embedding.bin, verify --bmodel gathers
    from it and needs transformers' tokens, with both mask encodings."""
    from tpugraph.compiler import CompileOptions, compile_segments

    report = compile_segments(variant, venv, CompileOptions(quantize="bf16", check="none"), jobs=2)
    assert report.passed and report.embedding_table == variant / COMPILED_NAME
    result = verify(variant, prompt=PROMPT, new_tokens=3, bmodel=report.bmodel, tpu_mlir=venv)
    assert result.passed and result.tokens_equal, result.to_json()
    assert result.mask_check["pattern"] == "0xF0E2" and result.mask_check["tokens"] == result.onnx_tokens
