"""Qwen3: q/k RMSNorm and an explicit head_dim unlike hidden/heads; tied (small sizes) and untied."""

import pytest
from family_harness import describe, export_verify  # noqa: F401

VARIANTS = {
    "head-dim-32-tied": dict(head_dim=32, tie_word_embeddings=True),
    "head-dim-8-untied-mqa": dict(head_dim=8, num_key_value_heads=1, tie_word_embeddings=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qwen3_verifies(export_verify, variant):
    result = export_verify("qwen3", **VARIANTS[variant])
    assert result.report.passed, describe(result.report)


def test_kv_shapes_use_head_dim(export_verify):
    result = export_verify("qwen3", head_dim=32)
    past_k = next(t for t in result.manifest.segment("block_0").outputs if t.name == "past_k")
    assert past_k.shape == (1, 32, 2, 32)
