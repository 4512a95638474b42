"""Gemma 4 text (dense, and the mixture-of-experts layout): per-layer embeddings, the last layers reusing an
earlier layer's KV, other head dims and KV heads on full layers, proportional partial rope on full layers,
attention_k_eq_v, v_norm, layer_scalar, plain RMSNorm, final logit soft-capping; exported and verified against
transformers token for token."""

from __future__ import annotations

import json

import pytest
from family_harness import SEQ, describe
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.contract.manifest import read_manifest
from tpugraph.errors import UsageError
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

SLIDING, FULL = "sliding_attention", "full_attention"
ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}
# GQA (4 heads over 2 KV heads, 1 on full layers), an odd vocabulary and hidden size, both layer types, the last
# two layers reusing layers 2 (sliding) and 3 (full), a window shorter than SEQ.
TINY_GEMMA4 = dict(vocab_size=389, hidden_size=50, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                   layer_types=[SLIDING, FULL, SLIDING, FULL, SLIDING, FULL], sliding_window=6,
                   num_kv_shared_layers=2, attention_k_eq_v=True, hidden_size_per_layer_input=8,
                   vocab_size_per_layer_input=389, final_logit_softcapping=30.0, max_position_embeddings=256,
                   rope_parameters=ROPE, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)

VARIANTS = {
    "ple-shared-kv-k-eq-v": {},
    # no per-layer embeddings, no sharing, separate v_proj on full layers, the window at least SEQ
    "plain": dict(hidden_size_per_layer_input=0, num_kv_shared_layers=0, attention_k_eq_v=False, sliding_window=SEQ,
                  num_hidden_layers=2, layer_types=[SLIDING, FULL], final_logit_softcapping=None),
    # double-wide MLP on the sharing layers, one layer of each type shared
    "double-wide-mlp": dict(use_double_wide_mlp=True, num_hidden_layers=4, layer_types=[SLIDING, FULL, SLIDING, FULL]),
}


def build_gemma4(folder, seed: int = 0, **overrides):
    """A random Gemma4ForCausalLM saved into ``folder``: norms off ones and a different layer_scalar per layer
    (checkpoints carry trained values; ones would hide a dropped or swapped one)."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(**{**TINY_GEMMA4, **overrides})
    config.architectures = ["Gemma4ForCausalLM"]
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(torch.randn_like(param) * 0.1)
        for i, layer in enumerate(model.model.layers):
            layer.layer_scalar.fill_(0.6 + 0.15 * i)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = build_gemma4(tmp_path_factory.mktemp("gemma4-model"))
    out = tmp_path_factory.mktemp("gemma4-out") / "out"
    export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ, passes=[]))
    return folder, out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gemma4_verifies(tmp_path, variant):
    folder = build_gemma4(tmp_path / "model", **VARIANTS[variant])
    out = tmp_path / "out"
    export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ, passes=[]))
    # 10 + 8 tokens: decode steps run past the window of 6 on the sliding layers, own and shared
    report = verify(out, prompt_length=10, new_tokens=8)
    assert report.passed and report.tokens_equal, describe(report)
    assert report.min_cosine >= 0.9999 and report.max_rel_diff <= 1e-3


def test_manifest_records_each_layers_kv_and_the_shared_inputs(exported):
    _, out = exported
    manifest = read_manifest(out)
    layers = manifest.model.layers_kv
    assert [(r.kv_heads, r.head_dim, r.kv_from) for r in layers] == [
        (2, 16, None), (1, 32, None), (2, 16, None), (1, 32, None), (2, 16, 2), (1, 32, 3)]
    assert manifest.model.per_layer_embedding == 8

    def io(name):
        seg = manifest.segment(name)
        return [(t.name, tuple(t.shape)) for t in seg.inputs], [(t.name, tuple(t.shape)) for t in seg.outputs]

    assert io("embedding")[1] == [("input_embed", (1, SEQ, 50)), ("per_layer_embeds", (1, SEQ, 6, 8))]
    ins, outs = io("block_cache_1")  # a full layer with its own KV
    assert ins[3:] == [("per_layer_embeds", (1, 1, 8)), ("inputs_embeds", (1, 1, 50)),
                       ("history_k", (1, SEQ, 1, 32)), ("history_v", (1, SEQ, 1, 32))]
    assert outs[1:] == [("past_k", (1, 1, 1, 32)), ("past_v", (1, 1, 1, 32))]
    ins, outs = io("block_4")  # reuses layer 2's (sliding) KV: no K/V out
    assert ins[5:] == [("shared_k", (1, SEQ, 2, 16)), ("shared_v", (1, SEQ, 2, 16))] and len(outs) == 1
    ins, outs = io("block_cache_5")  # reuses layer 3's: its history and the new row
    assert ins[5:] == [("shared_k", (1, SEQ + 1, 1, 32)), ("shared_v", (1, SEQ + 1, 1, 32))] and len(outs) == 1


def test_shared_layers_read_the_owner_kv(exported):
    """Feeding a shared block another layer's keys changes its output: the input is used, not decoration."""
    import numpy as np
    import onnxruntime as ort

    _, out = exported
    sess = ort.InferenceSession(str(out / "block_cache_4.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for v in sess.get_inputs():
        shape = [int(d) for d in v.shape]
        feeds[v.name] = (np.full(shape, 3, np.int32) if "int" in v.type else rng.standard_normal(shape).astype(np.float32))
    feeds["attention_mask"] = np.zeros_like(feeds["attention_mask"])
    (a,) = sess.run(None, feeds)
    # Other values drawn at random, not a scale of the same ones: the post-attention RMSNorm is scale-invariant,
    # so doubling V moves the output by float error only (that made this test pass or fail by luck).
    feeds["shared_v"] = rng.standard_normal(feeds["shared_v"].shape).astype(np.float32)
    (b,) = sess.run(None, feeds)
    assert np.abs(a - b).max() > 1e-2
    feeds["shared_k"] = rng.standard_normal(feeds["shared_k"].shape).astype(np.float32)
    (c,) = sess.run(None, feeds)
    assert np.abs(b - c).max() > 1e-2


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_families_lists_gemma4_with_its_quirks():
    result = cli("families", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    quirks = " ".join(rows["gemma4_text"]["quirks"])
    for quirk in ("per-layer embeddings", "reuse an earlier layer's KV", "head dim", "proportional", "k_eq_v",
                  "layer_scalar", "soft-capping"):
        assert quirk in quirks
    assert rows["gemma4_text"]["architectures"] == ["Gemma4ForCausalLM"]


def test_naming_other_than_llm_tpu_is_refused(exported, tmp_path):
    folder, _ = exported
    with pytest.raises(UsageError) as err:
        export_and_optimize(str(folder), tmp_path / "o", ExportOptions(seq_length=SEQ, naming="optimum"))
    assert err.value.option == "naming" and "gemma4_text" in str(err.value)
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_naming_refusal_is_one_line_exit_2(exported, tmp_path):
    folder, _ = exported
    result = cli("export-and-optimize", str(folder), "-o", str(tmp_path / "o"), "--naming", "genie")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --naming") and "llm-tpu" in errors[0], result.output


# The mixture-of-experts layout (26B-A4B): every layer runs the dense MLP and 4 routed experts (top 2) side by side,
# with per-layer embeddings and shared KV as in the dense variants (4 layers, 2 and 3 reusing 0's and 1's KV).
# hidden 64: transformers runs the experts with torch._grouped_mm, whose strides must be multiples of 16 bytes.
MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24, hidden_size=64,
           num_hidden_layers=4, layer_types=[SLIDING, FULL, SLIDING, FULL])


def build_gemma4_moe(folder, seed: int = 0, **overrides):
    """build_gemma4 with experts, the router's scales and the extra norms off ones (checkpoints carry trained
    values: ones would hide a dropped per_expert_scale or a swapped norm)."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(**{**TINY_GEMMA4, **MOE, **overrides})
    config.architectures = ["Gemma4ForCausalLM"]
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ("norm" in name and name.endswith("weight")) or name.endswith(("router.scale", "per_expert_scale")):
                param.add_(torch.randn_like(param) * 0.1)
        for i, layer in enumerate(model.model.layers):
            layer.layer_scalar.fill_(0.6 + 0.15 * i)
    model.save_pretrained(folder)
    return folder


def test_gemma4_moe_verifies(tmp_path):
    """Exact against transformers: the prefill runs every expert weighted by the routing, each decode step gathers
    the 2 chosen experts' matrices (Gather by the router's indices, as qwen3_moe's sparse_moe)."""
    import onnx

    folder = build_gemma4_moe(tmp_path / "model")
    out = tmp_path / "out"
    export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ, passes=[]))
    report = verify(out, prompt_length=10, new_tokens=8)
    assert report.passed and report.tokens_equal, describe(report)
    assert report.min_cosine >= 0.9999 and report.max_rel_diff <= 1e-3
    for name in ("block_cache_1", "block_cache_3"):  # a layer with its own KV, a shared one: both gather experts
        graph = onnx.load(str(out / f"{name}.onnx"), load_external_data=False).graph
        stacked = {t.name for t in graph.initializer if len(t.dims) == 3 and t.dims[0] == MOE["num_experts"]}
        gathered = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in stacked]
        assert len(gathered) == 2 and "TopK" in {n.op_type for n in graph.node}, name  # gate_up and down


def test_runtime_options_its_blocks_cannot_take_are_refused():
    """Options of other export modes (a prefill on a KV history, shorter prefill nets, the host gathering the
    embedding) are refused by name when set; an ExportOptions without such a field never is."""
    from types import SimpleNamespace

    from tpugraph.source.families import family_by_name

    fam = family_by_name("gemma4_text")
    assert fam.refused_option(ExportOptions()) is None
    for option, value in (("history_kv", True), ("max_input_length", 8), ("embedding_disk", True),
                          ("naming", "optimum")):
        refused = fam.refused_option(SimpleNamespace(**{option: value}))
        assert refused is not None and refused[0] == option and refused[1]
    assert fam.refused_option(SimpleNamespace(naming="llm-tpu", history_kv=False)) is None
