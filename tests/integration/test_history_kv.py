"""--max-input-length L and --history-kv (CONTRACT.md, second table): block_kv_i prefills up to L new tokens on top
of the KV history; the runtime keeps the cache between turns (multi-turn chat) and feeds long prompts in chunks.

Checked against transformers' own greedy generate on the whole conversation, and against one prefill of SEQ."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import TINY_LLAMA, build_model_dir
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.contract.manifest import read_manifest
from tpugraph.contract.segments import MASK_VALUE, ContractDims, SegmentKind, history_prefill_inputs, segment_specs
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import hf_greedy, verify
from tpugraph.runtime.loop import KvCache, PrefillUnsupported, SegmentRuntime
from tpugraph.source.families import FAMILIES, family_by_name

SEQ = 64
L = 16
runner = CliRunner()
DIMS = ContractDims(seq=SEQ, hidden=8, kv_heads=2, head_dim=4, vocab=50, layers=2, max_input=L)


# -- the contract as data --------------------------------------------------------------------------------------
def test_prefill_nets_take_L_tokens_and_decode_nets_keep_seq():
    specs = {s.name: s for s in segment_specs(DIMS, history_kv=True)}
    assert specs["embedding"].inputs[0].shape == (1, L)
    assert [t.shape for t in specs["block_0"].inputs] == [(1, L, 8), (1, L), (1, 1, L, L)]
    assert [t.shape for t in specs["block_0"].outputs] == [(1, L, 8), (1, L, 2, 4), (1, L, 2, 4)]
    kv = specs["block_kv_1"]
    assert kv.kind == SegmentKind.BLOCK_KV and kv.layer == 1
    assert [t.shape for t in kv.inputs] == [(1, L, 8), (1, L), (1, 1, L, SEQ + L), (1, SEQ, 2, 4), (1, SEQ, 2, 4)]
    assert [t.shape for t in kv.outputs] == [(1, L, 8), (1, L, 2, 4), (1, L, 2, 4)]
    assert specs["block_cache_0"].inputs[3].shape == (1, SEQ, 2, 4)
    assert specs["embedding_cache"].inputs[0].shape == (1, 1)
    order = [s.name for s in segment_specs(DIMS, history_kv=True)][2:5]
    assert order == ["block_0", "block_kv_0", "block_cache_0"]
    assert not any(s.kind == SegmentKind.BLOCK_KV for s in segment_specs(DIMS))


def test_history_prefill_mask_follows_the_contract():
    ids, pos, mask = history_prefill_inputs([7, 8, 9], history=5, length=4, seq=10)
    assert ids.tolist() == [[7, 8, 9, 0]] and pos.tolist() == [[5, 6, 7, 0]]
    assert mask.shape == (1, 1, 4, 14)
    for r in range(4):
        for c in range(14):
            visible = r < 3 and (c < 5 or (10 <= c and c - 10 <= r))
            assert mask[0, 0, r, c] == (0.0 if visible else MASK_VALUE), (r, c)
    with pytest.raises(ValueError):
        history_prefill_inputs([1] * 5, history=0, length=4, seq=10)
    with pytest.raises(ValueError):
        history_prefill_inputs([1] * 4, history=7, length=4, seq=10)


def test_history_kv_is_refused_like_any_option_with_the_reason():
    """One mechanism: a family whose layers cannot prefill on a KV history lists history_kv in refused_options."""
    refusing = {f.name for f in FAMILIES if any(o == "history_kv" for o, _, _ in f.refused_options)}
    # the linear-attention and short-convolution states, the shared-KV layers (the vision families take it: their
    # images' positions, rows and blocks are given to block_kv_i by the host; InternVL not yet)
    assert refusing == {"qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "lfm2", "lfm2_moe", "gemma4_text",
                        "internvl"}
    stateful = dataclasses.replace(family_by_name("llama"), name="stateful", refused_options=(
        ("history_kv", (False, None), "its layers carry a recurrent state besides the KV cache"),))
    assert stateful.refused_option(ExportOptions(history_kv=True)) == (
        "history_kv", "its layers carry a recurrent state besides the KV cache")
    assert stateful.refused_option(ExportOptions()) is None
    assert family_by_name("llama").refused_option(ExportOptions(history_kv=True)) is None


# -- exported -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    out = tmp_path_factory.mktemp("history-kv") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ, max_input_length=L, history_kv=True))
    return out


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ))
    return out


def test_manifest_records_the_options_and_block_kv_shares_the_layer_weights(chunked):
    manifest = read_manifest(chunked)
    assert manifest.options.max_input_length == L and manifest.options.history_kv is True
    names = [s.name for s in manifest.segments]
    assert {"block_kv_0", "block_kv_1"} <= set(names)
    kv = manifest.segment("block_kv_1")
    assert [t.shape for t in kv.inputs][2] == (1, 1, L, SEQ + L)
    # the second layer's block_kv reuses the first one's optimised graph (weight swapping), like block/block_cache
    assert kv.graph_reused_from == "block_kv_0"


def test_default_options_record_nothing_new(whole):
    options = read_manifest(whole).options.to_json()
    assert "max_input_length" not in options and "history_kv" not in options


def test_a_prompt_of_3L_tokens_in_chunks_gives_the_tokens_of_one_seq_prefill(chunked, whole):
    prompt = np.random.default_rng(1).integers(3, 500, size=3 * L).tolist()
    rt = SegmentRuntime(chunked)
    calls: list[str] = []
    rt.backend.run = (lambda run: lambda name, *a: (calls.append(name), run(name, *a))[1])(rt.backend.run)
    chunks = rt.generate(prompt, 6)
    one = SegmentRuntime(whole).generate(prompt, 6)
    assert chunks.tokens == one.tokens
    for a, b in zip(chunks.logits, one.logits):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert calls.count("block_0") == 1 and calls.count("block_kv_0") == 2  # 3 chunks: block, then 2 on history
    report = verify(chunked, prompt=prompt, new_tokens=6)
    assert report.passed and report.onnx_tokens == one.tokens


def test_verify_three_turns_passes_and_reuses_the_cache(chunked):
    report = verify(chunked, prompt_length=10, new_tokens=5, turns=3)
    assert report.passed, report.to_json()
    assert [t.turn for t in report.turns] == [1, 2, 3]
    for before, turn in zip(report.turns, report.turns[1:]):
        # only the previous reply's last token and the new user tokens are prefilled
        assert turn.new_tokens == 1 + 10 and turn.prompt_tokens == before.prompt_tokens + 5 + 10
    assert len(report.steps) == 15 and {s.turn for s in report.steps} == {1, 2, 3}


def test_a_new_turn_reuses_only_the_common_prefix(chunked):
    rt = SegmentRuntime(chunked)
    cache = KvCache()
    first = np.random.default_rng(2).integers(3, 500, size=20).tolist()
    reply = rt.generate(first, 4, cache=cache).tokens
    assert cache.tokens == first + reply[:-1]
    # a second turn that rewrites the end of the first: the cache rolls back to the shared prefix
    second = first[:12] + [5, 6, 7]
    got = rt.generate(second, 4, cache=cache).tokens
    assert got == SegmentRuntime(chunked).generate(second, 4).tokens


def test_without_history_kv_a_prompt_longer_than_L_is_refused(tmp_path):
    out = tmp_path / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=32, max_input_length=8))
    with pytest.raises(PrefillUnsupported, match="--history-kv"):
        SegmentRuntime(out).generate(list(range(3, 12)), 2)
    res = runner.invoke(app, ["run", str(out), "--prompt-ids", ",".join(map(str, range(3, 12)))])
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1].startswith("error: a prompt of 9 tokens")
    res = runner.invoke(app, ["verify", str(out), "--prompt-length", "4", "--new-tokens", "3", "--turns", "3"])
    assert res.exit_code != 0 and "error: turn 2" in res.output and "--history-kv" in res.output
    # a short prompt in one prefill of L still matches transformers
    assert verify(out, prompt_length=8, new_tokens=3).passed


@pytest.mark.parametrize("value", ["0", "65"])
def test_max_input_length_outside_1_to_seq_is_one_line(tmp_path, value):
    res = runner.invoke(app, ["export-and-optimize", "tiny-llama", "-o", str(tmp_path / "o"), "--seq-length", "64",
                              "--max-input-length", value])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: --max-input-length must be within 1..SEQ=64: the prefill nets take at most " \
                                 f"the decode window (got {value})"
    assert not (tmp_path / "o").exists()


def test_verify_turns_cli_prints_each_turn(chunked):
    res = runner.invoke(app, ["verify", str(chunked), "--turns", "2", "--prompt-length", "20", "--new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert "turn 2: conversation of 43 tokens, 21 prefilled (22 from the KV cache)" in res.output
    assert res.output.strip().endswith("PASS")
    res = runner.invoke(app, ["verify", str(chunked), "--turns", "0"])
    assert res.exit_code == 2 and res.output.strip() == "error: --turns must be >= 1 (got 0)"
    res = runner.invoke(app, ["verify", str(chunked), "--turns", "3", "--prompt-length", "30", "--new-tokens", "8"])
    assert res.exit_code == 2 and res.output.strip() == (  # a usage error, as in run (the exit-code table)
        "error: 3 turns of 30 prompt + 8 new tokens take up to 113 tokens and do not fit SEQ=64; use fewer --turns, "
        "--prompt-length or --new-tokens")


# -- the tiny presets and other layer kinds -------------------------------------------------------------------------
PRESETS = ["tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-phi", "tiny-gemma2", "tiny-gemma3", "tiny-glm4",
           "tiny-qwen3-moe"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_verifies_three_turns_with_history_kv(preset, tmp_path):
    out = tmp_path / "out"
    export_and_optimize(preset, out, ExportOptions(seq_length=SEQ, max_input_length=L, history_kv=True))
    report = verify(out, prompt_length=17, new_tokens=4, turns=3)  # the first prompt is fed in 2 chunks
    assert report.passed, json.dumps(report.to_json())[:2000]


def test_sliding_window_layers_stay_exact_across_chunks_and_turns(tmp_path):
    model = build_model_dir(tmp_path / "mistral", "mistral", sliding_window=6, **TINY_LLAMA)
    out = tmp_path / "out"
    export_and_optimize(str(model), out, ExportOptions(seq_length=48, max_input_length=8, history_kv=True))
    report = verify(out, prompt_length=12, new_tokens=4, turns=3)
    assert report.passed, json.dumps(report.to_json())[:2000]
    # the window really cuts: the same weights without it give other logits
    narrow = hf_greedy(model, report.prompt, 1, set())[1][0]
    wide = hf_greedy(build_model_dir(tmp_path / "wide", "mistral", sliding_window=None, **TINY_LLAMA),
                     report.prompt, 1, set())[1][0]
    assert np.abs(narrow - wide).max() > 1e-2


def test_test_data_covers_block_kv_with_a_real_history(tmp_path):
    out = tmp_path / "out"
    manifest = export_and_optimize("tiny-llama", out, ExportOptions(seq_length=32, max_input_length=8,
                                                                     history_kv=True, with_test_data=True))
    for entry in manifest.segments:
        data = np.load(out / entry.test_data.file)
        assert [data[t.name].shape for t in entry.inputs] == [t.shape for t in entry.inputs], entry.name
    kv = np.load(out / "test_data" / "block_kv_0_input.npz")
    assert kv["position_ids"].tolist() == [list(range(8, 16))]  # a chunk of L on a history of L tokens
    assert np.abs(kv["history_k"][0, :8]).sum() > 0 and np.all(kv["history_k"][0, 8:] == 0)
    assert read_manifest(out).segment("block_0").test_data.prefill_tokens == 8
