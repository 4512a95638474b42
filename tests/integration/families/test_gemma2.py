"""Gemma 2: sqrt(hidden) embedding scale, attention and final logit soft-capping, query_pre_attn_scalar,
sandwich norms, alternating sliding-window layers (exact for SEQ above and below the window)."""

import pytest
from family_harness import SEQ, describe, export_verify, onnx_nodes  # noqa: F401

# Caps small enough to bend these logits (the defaults 50/30 would be near-linear on a tiny model), and a
# query_pre_attn_scalar that is not head_dim, so each quirk shows up in the numbers.
QUIRKS = dict(head_dim=16, query_pre_attn_scalar=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
              initializer_range=0.05)

VARIANTS = {
    "window-at-least-seq": dict(QUIRKS, sliding_window=SEQ),
    "window-shorter-than-seq": dict(QUIRKS, sliding_window=4),
    "untied": dict(QUIRKS, sliding_window=4, tie_word_embeddings=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gemma2_verifies(export_verify, variant):
    result = export_verify("gemma2", **VARIANTS[variant])
    assert result.report.passed, describe(result.report)


def test_only_sliding_layers_get_window_masking(export_verify):
    result = export_verify("gemma2", **VARIANTS["window-shorter-than-seq"])
    # layer_types alternate sliding (0) / full (1); the layers are otherwise the same graph.
    assert onnx_nodes(result.out / "block_0.onnx") > onnx_nodes(result.out / "block_1.onnx")
    assert onnx_nodes(result.out / "block_cache_0.onnx") > onnx_nodes(result.out / "block_cache_1.onnx")
