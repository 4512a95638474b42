"""LFM2 (issue #24): hybrid gated short-convolution + full-attention layers; the short-convolution layers carry a
conv state in and out of their segments (export/short_conv.py), the attention layers a KV cache as usual."""

import pytest
import torch
from family_harness import TINY, describe, export_verify  # noqa: F401

CONV, FULL = "conv", "full_attention"
VARIANTS = {
    # conv, conv, attention, conv: a conv layer after an attention layer too; tied embeddings, K = 3
    "tied": dict(num_hidden_layers=4, layer_types=[CONV, CONV, FULL, CONV], tie_word_embeddings=True),
    # K = 4, biased conv and projections, odd sizes, untied, attention first
    "untied-bias-odd": dict(vocab_size=251, hidden_size=48, num_hidden_layers=3, layer_types=[FULL, CONV, CONV],
                            conv_L_cache=4, conv_bias=True, tie_word_embeddings=False, block_multiple_of=16),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lfm2_verifies(export_verify, variant):
    cfg = VARIANTS[variant]
    result = export_verify("lfm2", **cfg)
    assert result.report.passed, describe(result.report)
    model = result.manifest.model
    assert model.family == "lfm2"
    assert model.state_layers == [i for i, t in enumerate(cfg["layer_types"]) if t == CONV]
    conv = [1, cfg.get("hidden_size", TINY["hidden_size"]), cfg.get("conv_L_cache", 3)]
    assert model.state_shapes == {"conv_state": conv}
    first = model.state_layers[0]
    block, cache = result.manifest.segment(f"block_{first}"), result.manifest.segment(f"block_cache_{first}")
    assert [t.name for t in block.inputs] == ["input_states", "attention_mask"]
    assert [(t.name, list(t.shape)) for t in block.outputs][1:] == [("next_conv_state", conv)]
    assert [(t.name, list(t.shape)) for t in cache.inputs][1:] == [("conv_state", conv)]
    assert [(t.name, list(t.shape)) for t in cache.outputs][1:] == [("next_conv_state", conv)]
    assert any(note.startswith("state layers: ") and "short convolutions" in note for note in result.manifest.notes)
    full = result.manifest.segment(f"block_cache_{cfg['layer_types'].index(FULL)}")  # attention: KV as usual
    assert [t.name for t in full.inputs] == ["input_states", "position_ids", "attention_mask", "history_k", "history_v"]


def test_lfm2_prompt_shorter_than_the_conv(export_verify):
    """n = 2 < K = 3: the prefill's conv state is zero-padded on the left, as transformers pads it."""
    result = export_verify("lfm2", prompt_length=2, new_tokens=6, **VARIANTS["tied"])
    assert result.report.passed, describe(result.report)


def test_short_conv_segments_equal_transformers_layer_with_its_cache():
    """The static prefill and decode of one short-convolution layer against transformers' layer driven with its
    own DynamicCache: the same outputs and the same conv state, step after step."""
    from transformers import DynamicCache, Lfm2Config
    from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv

    from tpugraph.export.linear_attention import StateCapture
    from tpugraph.export.short_conv import rewrite_short_conv

    config = Lfm2Config(hidden_size=16, num_hidden_layers=1, layer_types=[CONV], conv_L_cache=3, conv_bias=True,
                        num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    torch.manual_seed(0)
    layer = torch.nn.Module()
    layer.conv = Lfm2ShortConv(config, 0).eval()
    reference = Lfm2ShortConv(config, 0).eval()
    reference.load_state_dict(layer.conv.state_dict())
    rewrite_short_conv(layer, config)
    seq, n = 8, 5
    x = torch.randn(1, seq, 16)
    cache = DynamicCache(config=config)
    with torch.no_grad():
        ref = reference(x[:, :n], cache=cache)
        state = StateCapture(valid=(torch.arange(seq) < n).float())
        out = layer.conv(x, cache=state)
        torch.testing.assert_close(out[:, :n], ref)
        torch.testing.assert_close(state.next_conv_state, cache.layers[0].conv_states[0])
        conv_state = state.next_conv_state
        for step in range(3):
            token = torch.randn(1, 1, 16)
            ref = reference(token, cache=cache)
            state = StateCapture(conv_state=conv_state)
            torch.testing.assert_close(layer.conv(token, cache=state), ref)
            torch.testing.assert_close(state.next_conv_state, cache.layers[0].conv_states[0])
            conv_state = state.next_conv_state


def test_options_the_conv_state_segments_cannot_honour_are_refused():
    from types import SimpleNamespace

    from tpugraph.source.families import family_by_name

    family = family_by_name("lfm2")
    assert family.refused_option(SimpleNamespace(naming="optimum"))[0] == "naming"
    assert family.refused_option(SimpleNamespace(history_kv=True))[0] == "history_kv"
    assert family.refused_option(SimpleNamespace(max_input_length=16))[0] == "max_input_length"
    assert family.refused_option(SimpleNamespace(history_kv=False, naming="llm-tpu")) is None


def test_lfm2_moe_verifies(export_verify):
    """LFM2-MoE: layer 0 dense, then 4 experts (top 2) with sigmoid routing and an expert bias; the checkpoint
    stores one w1/w3/w2 per expert (fused on load, as transformers does)."""
    result = export_verify("lfm2_moe", num_hidden_layers=3, layer_types=[CONV, FULL, CONV], num_dense_layers=1,
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, tie_word_embeddings=True)
    assert result.report.passed, describe(result.report)
    assert result.manifest.model.family == "lfm2_moe" and result.manifest.model.state_layers == [0, 2]
