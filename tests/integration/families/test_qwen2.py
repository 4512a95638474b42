"""Qwen2 / Qwen2.5: q/k/v bias, tied (0.5B-3B) or untied embeddings, optional sliding window on upper layers."""

import pytest
from family_harness import describe, export_verify  # noqa: F401

VARIANTS = {
    "untied": dict(tie_word_embeddings=False),
    "tied-mqa": dict(tie_word_embeddings=True, num_key_value_heads=1),
    "sliding-window-upper-layers": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qwen2_verifies(export_verify, variant):
    result = export_verify("qwen2", **VARIANTS[variant])
    assert result.report.passed, describe(result.report)


def test_qkv_bias_is_exported(export_verify):
    import onnx

    result = export_verify("qwen2")
    inits = {tuple(i.dims) for i in onnx.load(str(result.out / "block_0.onnx")).graph.initializer}
    assert (64,) in inits and (32,) in inits  # q bias (4 heads x 16) and k/v bias (2 KV heads x 16)
