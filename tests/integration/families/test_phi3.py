"""Phi-3 / Phi-4-mini: fused qkv and gate_up projections, longrope, partial rotary, sliding window."""

import pytest
from family_harness import describe, export_verify  # noqa: F401

HEAD_DIM = 16
# The 4.x form (type + the two factor lists, original_max at the top level); 5.x reads it too.
LONGROPE = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
            "long_factor": [2.0 + 0.5 * i for i in range(HEAD_DIM // 2)]}

VARIANTS = {
    "plain": dict(),
    # SEQ 32 <= original_max 64: transformers uses the short factors, and so does the baked table.
    "longrope-short": dict(rope_scaling=LONGROPE, original_max_position_embeddings=64),
    "partial-rotary-phi4-mini": dict(partial_rotary_factor=0.75, tie_word_embeddings=True),
    "sliding-window": dict(sliding_window=5),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_phi3_verifies(export_verify, variant):
    result = export_verify("phi3", **VARIANTS[variant])
    assert result.report.passed, describe(result.report)
