"""Mixture-of-experts families (issue #14): Qwen2-MoE (shared expert), Qwen3-MoE and Mixtral, with exact
top-k routing in static shapes: the decode block gathers the k chosen experts' matrices by the router's
indices, the prefill block runs every expert weighted by the routing (0 outside the top k)."""

import onnx
import pytest
import torch
from family_harness import describe, export_verify  # noqa: F401

E4K2 = dict(num_experts=4, num_experts_per_tok=2)
VARIANTS = {
    "qwen2_moe": [dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, tie_word_embeddings=False, **E4K2),
                  # an odd size, a dense layer among the sparse ones, k=3 of 5, unnormalised top-k
                  dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=5,
                       num_experts_per_tok=3, vocab_size=251, num_hidden_layers=3, mlp_only_layers=[1],
                       tie_word_embeddings=True)],
    "qwen3_moe": [dict(moe_intermediate_size=32, head_dim=16, norm_topk_prob=True, tie_word_embeddings=False, **E4K2),
                  dict(moe_intermediate_size=20, head_dim=16, num_experts=6, num_experts_per_tok=1,
                       norm_topk_prob=False, vocab_size=251, num_key_value_heads=1, tie_word_embeddings=True)],
    "mixtral": [dict(num_local_experts=4, num_experts_per_tok=2),
                dict(num_local_experts=3, num_experts_per_tok=2, intermediate_size=40, vocab_size=251,
                     sliding_window=4, tie_word_embeddings=True)],
    # router bias, biased experts, clamped SwiGLU, attention sinks; sliding window 4 < SEQ: masked in the block
    "gpt_oss": [dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=4,
                     swiglu_limit=1.0),
                dict(intermediate_size=24, num_local_experts=5, num_experts_per_tok=3, head_dim=16, vocab_size=251,
                     num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                     sliding_window=6, tie_word_embeddings=True)],
}
CASES = [(family, i) for family, configs in VARIANTS.items() for i in range(len(configs))]


@pytest.mark.parametrize("family,index", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_moe_family_verifies(export_verify, family, index):
    result = export_verify(family, **VARIANTS[family][index])
    assert result.report.passed, describe(result.report)
    assert result.manifest.model.family == family


def test_decode_gathers_k_experts_and_prefill_runs_all(export_verify):
    result = export_verify("qwen3_moe", new_tokens=2, **VARIANTS["qwen3_moe"][0])
    assert result.report.passed, describe(result.report)
    decode = onnx.load(str(result.out / "block_cache_0.onnx"))
    prefill = onnx.load(str(result.out / "block_0.onnx"))
    ops = lambda m: [n.op_type for n in m.graph.node]  # noqa: E731
    assert "TopK" in ops(decode) and "TopK" in ops(prefill)
    # decode: the two expert tensors are gathered by the router's indices; prefill gathers no weights
    assert ops(decode).count("Gather") >= 2
    for name in ("NonZero", "Loop", "ScatterND", "ScatterElements", "If"):
        assert name not in ops(decode) and name not in ops(prefill), name


@pytest.mark.parametrize("tokens", [1, 5])
def test_static_experts_equal_transformers_loop(tokens):
    """Both static forms against transformers' own Experts.forward (nonzero + index_add loop)."""
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from tpugraph.export.family_layers import moe_experts_all, moe_experts_gathered

    config = AutoConfig.for_model("qwen3_moe", hidden_size=16, moe_intermediate_size=8, num_experts=6,
                                  num_experts_per_tok=2)
    torch.manual_seed(tokens)
    block = Qwen3MoeSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(tokens, 16)
    _, weights, index = block.gate(x)
    want = block.experts(x, index, weights)
    torch.testing.assert_close(moe_experts_all(block.experts, x, index, weights), want, rtol=1e-5, atol=1e-5)
    if tokens == 1:
        torch.testing.assert_close(moe_experts_gathered(block.experts, x, index, weights), want, rtol=1e-5, atol=1e-5)


def test_fused_expert_weights_are_made_from_the_checkpoint(make_model):
    from safetensors.torch import load_file

    from tpugraph.export.fused_weights import with_fused_weights
    from tpugraph.source.families import family_by_name
    from tpugraph.source.weights import WeightStore

    folder = make_model("mixtral", vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2)
    raw = load_file(str(folder / "model.safetensors"))
    view = with_fused_weights(WeightStore(folder), family_by_name("mixtral"))
    prefix = "model.layers.0."
    gate_up = view.get(prefix + "mlp.experts.gate_up_proj")
    assert view.shape_and_dtype(prefix + "mlp.experts.gate_up_proj") == ((3, 16, 16), "F32")
    for e in range(3):
        torch.testing.assert_close(gate_up[e, :8], raw[f"{prefix}block_sparse_moe.experts.{e}.w1.weight"])
        torch.testing.assert_close(gate_up[e, 8:], raw[f"{prefix}block_sparse_moe.experts.{e}.w3.weight"])
        torch.testing.assert_close(view.get(prefix + "mlp.experts.down_proj")[e],
                                   raw[f"{prefix}block_sparse_moe.experts.{e}.w2.weight"])
    torch.testing.assert_close(view.get(prefix + "mlp.gate.weight"), raw[prefix + "block_sparse_moe.gate.weight"])
    assert prefix + "mlp.experts.down_proj" in view and prefix + "mlp.experts.down_proj" in view.keys()
    # listed as transformers holds them; the per-expert tensors stay readable by name
    assert not any(".experts.0." in k or "block_sparse_moe" in k for k in view.keys())
    assert prefix + "block_sparse_moe.experts.0.w1.weight" in view


def test_moe_block_with_a_missing_expert_is_one_clear_line(make_model, tmp_path):
    """A checkpoint whose expert tensors are incomplete is refused naming the weight, not a traceback."""
    from safetensors.torch import load_file, save_file

    from tpugraph.errors import ModelError
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize

    folder = make_model("qwen3_moe", vocab_size=64, hidden_size=16, moe_intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=3,
                        num_experts_per_tok=2)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.0.mlp.experts.0.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"experts\.0\.up_proj\.weight' is missing .*mlp\.experts\.gate_up_proj"):
        export_and_optimize(str(folder), tmp_path / "out", ExportOptions(seq_length=16, passes=[]))


@pytest.mark.parametrize("tokens", [1, 4])
def test_static_gpt_oss_experts_equal_transformers_loop(tokens):
    from transformers import AutoConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    from tpugraph.export.family_layers import gpt_oss_experts_all, gpt_oss_experts_gathered

    config = AutoConfig.for_model("gpt_oss", hidden_size=16, intermediate_size=8, num_local_experts=5,
                                  num_experts_per_tok=2, swiglu_limit=0.7)
    torch.manual_seed(tokens)
    mlp = GptOssMLP(config)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(tokens, 16)
    _, scores, index = mlp.router(x)
    want = mlp.experts(x, index, scores)
    torch.testing.assert_close(gpt_oss_experts_all(mlp.experts, x, index, scores), want, rtol=1e-5, atol=1e-5)
    if tokens == 1:
        torch.testing.assert_close(gpt_oss_experts_gathered(mlp.experts, x, index, scores), want, rtol=1e-5, atol=1e-5)


def test_moe_layers_reuse_one_optimised_graph(make_model, tmp_path):
    """Experts big enough to be set aside (>= 1 MB) keep their names through the chain: layers 1..2 get their
    weights swapped into layer 0's graphs, and the result still verifies."""
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize
    from tpugraph.proof.verify import verify

    folder = make_model("qwen3_moe", vocab_size=256, hidden_size=256, moe_intermediate_size=256, num_experts=8,
                        num_experts_per_tok=2, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    out = tmp_path / "out"
    manifest = export_and_optimize(str(folder), out, ExportOptions(seq_length=16))
    assert manifest.stats.segments_weight_swapped == 2 * 2
    assert manifest.segment("block_2").graph_reused_from == "block_0"
    report = verify(out, prompt_length=6, new_tokens=4)
    assert report.passed, describe(report)
