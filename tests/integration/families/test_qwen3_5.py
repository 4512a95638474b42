"""Qwen3.5 text (issue #14): hybrid gated full attention + gated DeltaNet linear attention, whose layers carry
a conv state and a recurrent state in and out of their segments (export/linear_attention.py)."""

import numpy as np
import pytest
import torch
from family_harness import TINY, describe, export_verify  # noqa: F401

from tpugraph.export.linear_attention import (
    chunk_gated_delta_rule_static,
    recurrent_gated_delta_step,
    unit_lower_inverse,
)

# GQA in both kinds of layers: 4 query heads on 2 KV heads, 2 key heads shared by 4 value heads.
LINEAR = dict(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
              linear_value_head_dim=12, linear_conv_kernel_dim=4)
ODD = dict(vocab_size=251, intermediate_size=100, num_hidden_layers=3, linear_value_head_dim=10,
           linear_conv_kernel_dim=3)  # layers 0, 1 linear, 2 full (interval 3); no power of two

VARIANTS = {
    "untied": dict(LINEAR, num_hidden_layers=4, full_attention_interval=2, tie_word_embeddings=False),
    "tied-odd": dict(LINEAR, **ODD, full_attention_interval=3, tie_word_embeddings=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qwen3_5_verifies(export_verify, variant):
    result = export_verify("qwen3_5_text", **VARIANTS[variant])
    assert result.report.passed, describe(result.report)
    model = result.manifest.model
    assert model.family == "qwen3_5_text"
    layers = model.num_layers
    interval = VARIANTS[variant]["full_attention_interval"]
    assert model.state_layers == [i for i in range(layers) if (i + 1) % interval]
    cfg = VARIANTS[variant]
    conv_dim = 2 * cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"] \
        + cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
    conv = [1, conv_dim, cfg["linear_conv_kernel_dim"]]
    recurrent = [1, cfg["linear_num_value_heads"], cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]]
    assert model.state_shapes == {"conv_state": conv, "recurrent_state": recurrent}
    block, cache = result.manifest.segment("block_0"), result.manifest.segment("block_cache_0")
    assert [t.name for t in block.inputs] == ["input_states", "attention_mask"]
    assert [(t.name, list(t.shape)) for t in block.outputs][1:] == [("next_conv_state", conv),
                                                                    ("next_recurrent_state", recurrent)]
    assert [(t.name, list(t.shape)) for t in cache.inputs][1:] == [("conv_state", conv), ("recurrent_state", recurrent)]
    assert any(note.startswith("state layers: ") for note in result.manifest.notes), result.manifest.notes
    full = result.manifest.segment(f"block_cache_{interval - 1}")  # a gated full-attention layer: KV as usual
    assert [t.name for t in full.inputs] == ["input_states", "position_ids", "attention_mask", "history_k", "history_v"]


@pytest.mark.slow
def test_qwen3_5_prompt_over_two_chunks_and_shorter_than_the_conv(export_verify):
    """SEQ 96 pads to two 64-chunks; a 70-token prompt puts real tokens in both and pad rows after them."""
    long = export_verify("qwen3_5_text", seq=96, prompt_length=70, new_tokens=4,
                         **VARIANTS["untied"], max_position_embeddings=256)
    assert long.report.passed, describe(long.report)
    short = export_verify("qwen3_5_text", prompt_length=2, new_tokens=6, **VARIANTS["untied"])  # n = 2 < K = 4
    assert short.report.passed, describe(short.report)


def _random_rule_inputs(seq, hk=2, hv=4, dk=8, dv=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, seq, hk, dk, generator=gen), torch.randn(1, seq, hk, dk, generator=gen)
    v = torch.randn(1, seq, hv, dv, generator=gen)
    g = -torch.rand(1, seq, hv, generator=gen) * 2
    beta = torch.rand(1, seq, hv, generator=gen)
    return q, k, v, g, beta


@pytest.mark.parametrize("seq,n", [(16, 16), (16, 11), (100, 77), (128, 128), (130, 3)])
def test_static_chunked_rule_equals_transformers(seq, n):
    """Outputs of the n prompt rows and the final state equal transformers' rule run on those n rows only:
    the pad rows (g = beta = 0) leave the state untouched."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    q, k, v, g, beta = _random_rule_inputs(seq)
    valid = (torch.arange(seq) < n).float().reshape(1, seq, 1)
    out, state = chunk_gated_delta_rule_static(q, k, v, g * valid, beta * valid)
    ref, ref_state = hf.torch_chunk_gated_delta_rule(q[:, :n], k[:, :n], v[:, :n], g[:, :n], beta[:, :n],
                                                     output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(out[:, :n], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-4)
    # one decode step from that state
    q1, k1, v1, g1, b1 = _random_rule_inputs(1, seed=1)
    step, step_state = recurrent_gated_delta_step(q1, k1, v1, g1, b1, state)
    ref_step, ref_step_state = hf.torch_recurrent_gated_delta_rule(q1, k1, v1, g1, b1, initial_state=ref_state,
                                                                   output_final_state=True,
                                                                   use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(step, ref_step, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step_state, ref_step_state, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [1, 2, 3, 16, 37, 64])
def test_unit_lower_inverse_is_the_inverse(size):
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(size)).tril(-1) * 0.3
    eye = torch.eye(size)
    np.testing.assert_allclose((unit_lower_inverse(a) @ (eye + a)).numpy(), eye.numpy(), atol=1e-5)


def test_options_the_state_segments_cannot_honour_are_refused(make_model, tmp_path):
    """One error line, exit 2, nothing written: the state I/O have llm-tpu names only; a prefill on top of a
    history (--history-kv, where the runtime options provide it) would need the states as prefill inputs."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from tpugraph.cli import app
    from tpugraph.source.families import family_by_name

    folder = make_model("qwen3_5_text", **{**TINY, **VARIANTS["untied"]})
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export-and-optimize", str(folder), "-o", str(out), "--naming", "optimum"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--naming" in errors[0] and "qwen3_5_text" in errors[0], result.output
    assert "Traceback" not in result.output and not out.exists()
    family = family_by_name("qwen3_5_text")
    assert family.refused_option(SimpleNamespace(history_kv=True))[0] == "history_kv"
    assert family.refused_option(SimpleNamespace(max_input_length=16))[0] == "max_input_length"
    assert family.refused_option(SimpleNamespace(history_kv=False, naming="llm-tpu")) is None


def test_families_lists_qwen3_5_with_its_quirks():
    import json

    from typer.testing import CliRunner

    from tpugraph.cli import app

    result = CliRunner().invoke(app, ["families", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = [f for f in json.loads(result.output) if f["name"] == "qwen3_5_text"]
    assert row["architectures"] == ["Qwen3_5ForCausalLM"]
    quirks = " ".join(row["quirks"])
    assert "gated DeltaNet" in quirks and "recurrent state" in quirks and "partial rotary" in quirks
