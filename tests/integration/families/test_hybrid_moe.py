"""Qwen3.5-MoE (text) and Qwen3-Next (issue #24): hybrid gated-DeltaNet layers (state segments, as qwen3_5_text)
whose MLPs are mixtures of experts with a sigmoid-gated shared expert (static routing, as qwen2_moe): the decode
block gathers the k chosen experts, the prefill block runs every expert weighted by the routing."""

from types import SimpleNamespace

import onnx
import pytest
from family_harness import TINY, describe, export_verify  # noqa: F401

# GQA in both kinds of layers (4 query heads on 2 KV heads; 2 key heads shared by 4 value heads), 4 experts, top 2.
HYBRID = dict(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
              linear_value_head_dim=12, linear_conv_kernel_dim=4, full_attention_interval=2,
              moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
              tie_word_embeddings=False)
# No power of two: layers 0, 1 linear, 2 full; k=3 of 5 experts; tied embeddings.
ODD = dict(HYBRID, vocab_size=251, num_hidden_layers=3, full_attention_interval=3, linear_value_head_dim=10,
           linear_conv_kernel_dim=3, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=5,
           num_experts_per_tok=3, tie_word_embeddings=True)

VARIANTS = {
    "qwen3_5_moe_text": {"untied": HYBRID, "tied-odd": ODD},
    # Qwen3-Next: one key head shared by 3 value heads in the fused per-key-head projections, a dense MLP layer
    # among the sparse ones, unnormalised top-k
    "qwen3_next": {"untied": HYBRID,
                   "tied-odd-dense": dict(ODD, linear_num_key_heads=1, linear_num_value_heads=3, mlp_only_layers=[1],
                                          intermediate_size=72, norm_topk_prob=False)},
}
CASES = [(family, name) for family, variants in VARIANTS.items() for name in variants]


@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_hybrid_moe_family_verifies(export_verify, family, variant):
    cfg = VARIANTS[family][variant]
    result = export_verify(family, **cfg)
    assert result.report.passed, describe(result.report)
    model = result.manifest.model
    assert model.family == family
    interval = cfg["full_attention_interval"]
    assert model.state_layers == [i for i in range(model.num_layers) if (i + 1) % interval]
    conv_dim = 2 * cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"] \
        + cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
    conv = [1, conv_dim, cfg["linear_conv_kernel_dim"]]
    recurrent = [1, cfg["linear_num_value_heads"], cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]]
    assert model.state_shapes == {"conv_state": conv, "recurrent_state": recurrent}
    cache = result.manifest.segment("block_cache_0")
    assert [(t.name, list(t.shape)) for t in cache.inputs][1:] == [("conv_state", conv), ("recurrent_state", recurrent)]
    full = result.manifest.segment(f"block_cache_{interval - 1}")  # a gated full-attention layer: KV as usual
    assert [t.name for t in full.inputs] == ["input_states", "position_ids", "attention_mask", "history_k", "history_v"]
    ops = lambda name: [n.op_type for n in onnx.load(str(result.out / f"{name}.onnx")).graph.node]  # noqa: E731
    dense = set(cfg.get("mlp_only_layers", ()))
    for layer in range(model.num_layers):  # every sparse layer routes (TopK); its decode gathers the experts
        decode, prefill = ops(f"block_cache_{layer}"), ops(f"block_{layer}")
        assert ("TopK" in decode and "TopK" in prefill) == (layer not in dense), layer
        if layer not in dense:
            assert decode.count("Gather") >= 2, layer
        for op in ("NonZero", "Loop", "ScatterND", "ScatterElements", "If"):
            assert op not in decode and op not in prefill, (layer, op)


@pytest.mark.parametrize("family", list(VARIANTS))
def test_state_options_are_refused_as_for_qwen3_5(family):
    from tpugraph.source.families import family_by_name

    spec = family_by_name(family)
    assert spec.refused_option(SimpleNamespace(naming="optimum"))[0] == "naming"
    assert spec.refused_option(SimpleNamespace(history_kv=True))[0] == "history_kv"
    assert spec.refused_option(SimpleNamespace(max_input_length=16))[0] == "max_input_length"
    assert spec.refused_option(SimpleNamespace(history_kv=False, naming="llm-tpu")) is None


def test_the_text_model_of_the_vision_language_checkpoint_verifies(tmp_path):
    """Qwen3.5-MoE ships as Qwen3_5MoeForConditionalGeneration (model_type qwen3_5_moe; text weights under
    model.language_model., a vision tower beside them): exported as its text model, as AutoModelForCausalLM
    loads it, and verified against that; no vit segment, the vision weights left unread."""
    import torch
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from tpugraph.export.pipeline import ExportOptions, export_and_optimize
    from tpugraph.proof.verify import verify
    from tpugraph.source.weights import WeightStore

    text = dict(TINY, **HYBRID, initializer_range=0.2)
    tie = text.pop("tie_word_embeddings")
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
    config = Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, image_token_id=250,
                              video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(torch.randn_like(param) * 0.1)  # trained norms are not all ones
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    keys = WeightStore(folder).keys()
    assert any(k.startswith("model.language_model.layers.") for k in keys) and any(".visual." in k for k in keys)
    manifest = export_and_optimize(str(folder), tmp_path / "out", ExportOptions(seq_length=32, passes=[]))
    assert manifest.model.family == "qwen3_5_moe_text" and manifest.model.state_layers == [0]
    assert not any(s.name.startswith("vit") for s in manifest.segments)
    report = verify(tmp_path / "out", prompt_length=8, new_tokens=8)
    assert report.passed, describe(report)
