"""The 2026 dense newcomers (issue #14): GLM, GLM-4 and ERNIE 4.5 (interleaved rotary, rewritten with
static ops), Seed-OSS, Hunyuan dense, and InternLM3 as transformers loads it (Llama)."""

import json

import pytest
import torch
from family_harness import SEQ, TINY, describe, export_verify  # noqa: F401

from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

ODD = dict(vocab_size=251, intermediate_size=100, num_hidden_layers=3)  # sizes that are no power of two

VARIANTS = {
    "glm": [dict(head_dim=16, tie_word_embeddings=False),  # partial rotary 0.5: 8 of 16 lanes rotate
            dict(head_dim=24, tie_word_embeddings=True, attention_bias=False, num_key_value_heads=1, **ODD)],
    "glm4": [dict(head_dim=16, tie_word_embeddings=False),
             dict(head_dim=16, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=500.0,
                                                                             partial_rotary_factor=0.75), **ODD)],
    "ernie4_5": [dict(head_dim=16, tie_word_embeddings=True, use_bias=True),  # full interleaved rotary
                 dict(head_dim=16, tie_word_embeddings=False, **ODD)],
    "seed_oss": [dict(head_dim=16, tie_word_embeddings=False, attention_out_bias=True),
                 dict(head_dim=16, tie_word_embeddings=True, **ODD)],
    "hunyuan_v1_dense": [dict(head_dim=16, tie_word_embeddings=False, attention_bias=True),
                         dict(head_dim=16, tie_word_embeddings=True, **ODD)],
    # dense decoders that needed only declarations: each quirk set to a value that shows in the numbers
    "olmo": [dict(clip_qkv=0.3, tie_word_embeddings=False), dict(tie_word_embeddings=True, **ODD)],
    "arcee": [dict(head_dim=16, tie_word_embeddings=False), dict(head_dim=16, tie_word_embeddings=True, **ODD)],
    "nemotron": [dict(head_dim=16, tie_word_embeddings=False), dict(head_dim=16, tie_word_embeddings=True, **ODD)],
    "jais2": [dict(head_dim=16, tie_word_embeddings=False), dict(head_dim=16, tie_word_embeddings=True, **ODD)],
    "ministral3": [dict(head_dim=16, sliding_window=4, tie_word_embeddings=False,
                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                             original_max_position_embeddings=8, llama_4_scaling_beta=0.5)),
                   dict(head_dim=16, tie_word_embeddings=True, **ODD)],
    "cwm": [dict(head_dim=16, sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
            dict(head_dim=16, tie_word_embeddings=True, sliding_window=5,
                 layer_types=["full_attention", "sliding_attention", "sliding_attention"], **ODD)],
    "hyperclovax": [dict(head_dim=16, embedding_multiplier=3.0, logits_scaling=0.25, residual_multiplier=0.5,
                         attention_multiplier=0.1, tie_word_embeddings=False),
                    dict(head_dim=16, embedding_multiplier=0.5, logits_scaling=2.0, tie_word_embeddings=True, **ODD)],
    "granite_swa": [dict(embedding_multiplier=6.0, logits_scaling=4.0, residual_multiplier=0.3, attention_multiplier=0.05,
                         sliding_window=4, layer_types=["full_attention", "sliding_attention"],
                         tie_word_embeddings=True)],
}

CASES = [(family, i) for family, configs in VARIANTS.items() for i in range(len(configs))]


@pytest.mark.parametrize("family,index", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_newcomer_verifies(export_verify, family, index):
    result = export_verify(family, **VARIANTS[family][index])
    assert result.report.passed, describe(result.report)
    assert result.manifest.model.family == family


# ERNIE 4.5 rotates every lane (its apply_rotary_pos_emb has no partial rotary); GLM rotates a part or all.
@pytest.mark.parametrize("module_name,rotary_dim,head_dim",
                         [("glm", 8, 16), ("glm", 16, 16), ("glm", 12, 24), ("ernie4_5", 16, 16), ("ernie4_5", 24, 24)])
def test_static_interleaved_rotary_equals_transformers(module_name, rotary_dim, head_dim):
    """The Gather rewrite against transformers' own apply_rotary_pos_emb (repeat_interleave + stack)."""
    import importlib

    from tpugraph.export.family_layers import apply_interleaved_rotary

    hf = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    gen = torch.Generator().manual_seed(rotary_dim)
    q, k = torch.randn(1, 4, 5, head_dim, generator=gen), torch.randn(1, 2, 5, head_dim, generator=gen)
    freqs = torch.randn(1, 5, rotary_dim // 2, generator=gen)
    emb = torch.cat([freqs, freqs], dim=-1)  # what the rotary modules return: the halves repeat
    want = hf.apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    got = apply_interleaved_rotary(q, k, emb.cos(), emb.sin())
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_block_has_no_repeat_interleave_leftovers(export_verify):
    """The rewritten GLM block is static: no op that only a dynamic-shape graph needs."""
    import onnx

    result = export_verify("glm4", head_dim=16, new_tokens=2)
    assert result.report.passed, describe(result.report)
    for name in ("block_0", "block_cache_0"):
        ops = {n.op_type for n in onnx.load(str(result.out / f"{name}.onnx")).graph.node}
        assert not ops & {"Loop", "Range", "NonZero", "Tile", "ScatterND"}, (name, ops)


def test_internlm3_checkpoint_exports_as_llama(make_model, tmp_path):
    """transformers 5.24 has InternLM3 natively (its config, Llama's modules). A checkpoint whose config says
    InternLM3ForCausalLM, as InternLM's own do, is found by that architecture and verifies."""
    folder = make_model("internlm3", **{**TINY, "head_dim": 16, "attention_bias": True, "mlp_bias": True})
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "internlm3"
    config["architectures"] = ["InternLM3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    manifest = export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ, passes=[]))
    assert manifest.model.family == "llama"
    report = verify(out, prompt_length=8, new_tokens=8)
    assert report.passed, describe(report)
