"""Phi (phi-1/1.5/2): partial rotary, parallel attention and MLP, LayerNorm, final_layernorm, lm_head bias."""

import onnx
import pytest
from family_harness import describe, export_verify  # noqa: F401

VARIANTS = {
    "phi2-mha": dict(num_key_value_heads=4, partial_rotary_factor=0.4),
    "qk-layernorm-gqa": dict(qk_layernorm=True, partial_rotary_factor=0.5),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_phi_verifies(export_verify, variant):
    result = export_verify("phi", **VARIANTS[variant])
    assert result.report.passed, describe(result.report)


def test_lm_head_has_final_layernorm_and_bias(export_verify):
    result = export_verify("phi", num_key_value_heads=4, partial_rotary_factor=0.4)
    model = onnx.load(str(result.out / "lm_head.onnx"))
    shapes = sorted(tuple(i.dims) for i in model.graph.initializer)
    assert (256,) in shapes  # lm_head bias
    assert shapes.count((64,)) >= 2  # final_layernorm weight and bias
