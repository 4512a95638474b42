"""Gemma 3 text: sqrt(hidden) embedding scale, q/k RMSNorm, query_pre_attn_scalar, a rope per layer type
(local base 10k for sliding layers, global 1M), sliding-window layers, optional final soft-capping."""

import pytest
from family_harness import SEQ, describe, export_verify  # noqa: F401

MIXED = dict(layer_types=["sliding_attention", "full_attention"], head_dim=16, query_pre_attn_scalar=8,
             initializer_range=0.05)

VARIANTS = {
    "window-at-least-seq": dict(MIXED, sliding_window=SEQ),
    "window-shorter-than-seq": dict(MIXED, sliding_window=4),
    "final-softcap-untied": dict(MIXED, sliding_window=4, final_logit_softcapping=3.0, tie_word_embeddings=False),
    "three-layers-gqa-1": dict(MIXED, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               num_hidden_layers=3, num_key_value_heads=1, sliding_window=6),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gemma3_verifies(export_verify, variant):
    result = export_verify("gemma3_text", **VARIANTS[variant])
    assert result.report.passed, describe(result.report)


def test_local_and_global_layers_bake_different_rotary_tables(export_verify):
    import onnx
    from onnx import numpy_helper

    result = export_verify("gemma3_text", **VARIANTS["window-at-least-seq"])

    def tables(name):
        """The [SEQ, head_dim] cos/sin constants of a block (Constant nodes or initializers)."""
        model = onnx.load(str(result.out / f"{name}.onnx"))
        tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                                   for a in n.attribute if a.name == "value"]
        return {numpy_helper.to_array(t).tobytes() for t in tensors if tuple(t.dims) == (SEQ, 16)}

    local, full = tables("block_0"), tables("block_1")
    assert local and full and local.isdisjoint(full)
