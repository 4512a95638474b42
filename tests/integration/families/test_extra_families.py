"""The further families: each one's own quirks set to values that show in the numbers."""

import pytest
from family_harness import describe, export_verify  # noqa: F401

MIXED = ["sliding_attention", "full_attention"]

VARIANTS = {
    "granite": [dict(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                     attention_multiplier=0.0078, tie_word_embeddings=True)],
    "cohere": [dict(logit_scale=0.5, use_qk_norm=True, tie_word_embeddings=True),
               dict(logit_scale=0.0625, tie_word_embeddings=False)],
    "cohere2": [dict(layer_types=MIXED, sliding_window=4, logit_scale=0.5)],
    "olmo2": [dict(tie_word_embeddings=False), dict(tie_word_embeddings=True, num_key_value_heads=1)],
    "olmo3": [dict(layer_types=MIXED, sliding_window=4)],
    "stablelm": [dict(partial_rotary_factor=0.25, use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True),
                 dict(partial_rotary_factor=0.25)],
    "starcoder2": [dict(sliding_window=4, use_bias=True)],
    "smollm3": [dict(no_rope_layers=[1, 0]),  # layer 1 is NoPE: its blocks do not read position_ids
                dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)],
    "ministral": [dict(layer_types=MIXED, sliding_window=4, head_dim=16)],
    "exaone4": [dict(layer_types=MIXED, sliding_window=4)],
}

CASES = [(family, i) for family, configs in VARIANTS.items() for i in range(len(configs))]


@pytest.mark.parametrize("family,index", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_family_verifies(export_verify, family, index):
    from tpugraph.source.families import family_by_name

    model_type = family_by_name(family).model_types[0]
    result = export_verify(model_type, **VARIANTS[family][index])
    assert result.report.passed, describe(result.report)


def test_nope_layer_keeps_position_ids_as_input(export_verify):
    import onnx

    from tpugraph.export.exporter import unused_graph_inputs

    result = export_verify("smollm3", no_rope_layers=[1, 0])
    for name in ("block_1", "block_cache_1"):
        model = onnx.load(str(result.out / f"{name}.onnx"))
        assert [i.name for i in model.graph.input][:2] == ["input_states", "position_ids"]
        assert unused_graph_inputs(model) == ["position_ids"]
    assert unused_graph_inputs(onnx.load(str(result.out / "block_0.onnx"))) == []
