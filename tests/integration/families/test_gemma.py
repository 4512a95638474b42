"""Gemma (1): embedding scaled by sqrt(hidden), RMSNorm with (1 + w), head_dim unlike hidden/heads."""

import pytest
from family_harness import describe, export_verify  # noqa: F401


@pytest.mark.parametrize("config", [dict(head_dim=24, initializer_range=0.05),
                                    dict(num_key_value_heads=1, initializer_range=0.05)])
def test_gemma_verifies(export_verify, config):
    result = export_verify("gemma", **config)
    assert result.report.passed, describe(result.report)
