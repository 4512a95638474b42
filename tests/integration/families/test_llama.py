"""Llama 2 (MHA, untied) and Llama 3.x (GQA, llama3 rope scaling, tied like 3.2 1B/3B)."""

import pytest
from family_harness import describe, export_verify  # noqa: F401

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

VARIANTS = {
    "llama2-mha-untied": dict(num_key_value_heads=4),
    # original_max 16 < SEQ: the llama3 scaling changes the low frequencies the table is made of
    "llama3-gqa-tied-rope-scaling": dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "head-dim-not-hidden-over-heads": dict(head_dim=24, num_key_value_heads=1),
    "attention-and-mlp-bias": dict(attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_verifies(export_verify, variant):
    result = export_verify("llama", **VARIANTS[variant])
    assert result.report.passed, describe(result.report)
