"""--history-kv on the cmodel: a BF16 bmodel with block_kv_i answers a 3-turn conversation like transformers (each
turn prefilling only its new tokens on the history), a prompt of 3L tokens fed in chunks like one prefill, and the
combined bmodel holds each layer's weights once for block_i, block_kv_i and block_cache_i. Tiny preset, SEQ 32."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.compiler.plan import deploy_flags
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify
from tpugraph.runtime.conversation import IdsConversation
from tpugraph.runtime.loop import KvCache, SegmentRuntime
from tpugraph.tpu_mlir.toolchain import tool_environment

SEQ = 32
L = 8
NEW = 3
# The tiny preset's random logits have many near-ties (top-2 gaps under 1% of the logit span at most steps), and
# BF16 moves a logit by up to ~2% of the span here (the largest difference over the vocabulary, measured): a step
# whose two best fp32 logits are closer than that may flip in BF16 without anything being wrong, so the
# conversations checked are the first seeds whose every greedy step is clearer than that.
CLEAR_MARGIN = 0.02


def test_block_kv_deploys_with_the_flags_of_block():
    for quantize in ("bf16", "w4bf16"):
        options = CompileOptions(quantize=quantize).check_options()
        assert deploy_flags("block_kv", options) == deploy_flags("block", options)
        assert "--addr_mode" not in deploy_flags("block_kv", options)


def _min_margin(out, prompt: list[int], turns: int, seed: int) -> float:
    """The smallest gap between the two best logits over every greedy step of the conversation verify runs."""
    rt = SegmentRuntime(out)
    conversation = IdsConversation(prompt, 512, seed)
    cache, margins = KvCache(), []
    for turn in range(turns):
        trace = rt.generate(conversation.prompt_ids(), NEW, cache=cache)
        for logits in trace.logits:
            top = np.sort(logits)
            margins.append((top[-1] - top[-2]) / (top[-1] - top[0]))
        conversation.add_reply(trace.tokens, set())
        conversation.add_user_turn()
    return float(min(margins))


def _clear_seed(out, length: int, turns: int) -> int:
    for seed in range(50):
        prompt = np.random.default_rng(seed).integers(3, 512, size=length).tolist()  # verify's own prompt draw
        if _min_margin(out, prompt, turns, seed) >= CLEAR_MARGIN:
            return seed
    raise AssertionError("no conversation without near-ties among 50 seeds")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, toolchain):
    out = tmp_path_factory.mktemp("history-kv-bmodel") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ, max_input_length=L, history_kv=True))
    report = compile_segments(out, toolchain, CompileOptions(quantize="bf16", check="none"), jobs=2)
    return out, report.bmodel


def _weight_bytes(bmodel, venv) -> int:
    info = subprocess.run(["model_tool", "--info", str(bmodel), "--all"], env=tool_environment(venv),
                          capture_output=True, text=True, check=True).stdout
    return int(re.search(r"device mem size: \d+ \(weight: (\d+)", info).group(1))


@pytest.mark.slow
def test_combined_bmodel_keeps_one_copy_of_each_layers_weights(compiled, toolchain):
    out, bmodel = compiled
    net = {name: _weight_bytes(out / "compile" / "bf16_bm1684x_1dev" / name / f"{name}.bmodel", toolchain)
           for name in ("embedding", "block_0", "block_kv_0", "block_cache_0", "block_1", "lm_head")}
    assert net["block_0"] == net["block_kv_0"] == net["block_cache_0"] > 0
    # embedding_cache shares the embedding's table; each layer's three nets share one copy
    assert _weight_bytes(bmodel, toolchain) == net["embedding"] + net["block_0"] + net["block_1"] + net["lm_head"]


@pytest.mark.slow
def test_bf16_bmodel_verifies_three_turns_and_a_chunked_prompt(compiled, toolchain):
    out, bmodel = compiled
    seed = _clear_seed(out, 4, 3)
    report = verify(out, prompt_length=4, new_tokens=NEW, seed=seed, turns=3, bmodel=bmodel, tpu_mlir=toolchain)
    assert report.dtype == "bmodel-bf16" and not report.teacher_forced
    assert report.passed, report.to_json()
    assert [t.new_tokens for t in report.turns] == [4, 1 + 4, 1 + 4]  # later turns: only the new tokens
    # 3L tokens: block_i on the first L, block_kv_i on the next two chunks; transformers is one whole prefill
    seed = _clear_seed(out, 3 * L, 1)
    chunked = verify(out, prompt_length=3 * L, new_tokens=NEW, seed=seed, bmodel=bmodel, tpu_mlir=toolchain)
    assert chunked.passed and chunked.tokens_equal, chunked.to_json()


@pytest.fixture(scope="module")
def compiled_dynamic(compiled, toolchain):
    out, _ = compiled
    report = compile_segments(out, toolchain, CompileOptions(quantize="bf16", check="none", dynamic=True), jobs=2)
    return report.bmodel


def _dynamic_nets(bmodel, venv) -> set[str]:
    info = subprocess.run(["model_tool", "--info", str(bmodel)], env=tool_environment(venv),
                          capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"^net \d+: \[([^\]]+)\]\s+dynamic", info, re.MULTILINE))


@pytest.mark.slow
def test_dynamic_prefill_bmodel_gives_the_static_bmodels_tokens(compiled, compiled_dynamic, toolchain):
    """compile --dynamic: block_i / block_kv_i run at the real length (forward_dynamic): turn 1 prefills 5 < L
    tokens through block_i, turn 2 its new tokens through block_kv_i; tokens and logits as the static bmodel's."""
    out, static_bmodel = compiled
    assert _dynamic_nets(compiled_dynamic, toolchain) == {f"{kind}_{i}" for kind in ("block", "block_kv")
                                                            for i in range(2)}
    assert not _dynamic_nets(static_bmodel, toolchain)
    seed = _clear_seed(out, 5, 2)
    reports = {}
    for name, bmodel in (("static", static_bmodel), ("dynamic", compiled_dynamic)):
        reports[name] = verify(out, prompt_length=5, new_tokens=NEW, seed=seed, turns=2, bmodel=bmodel,
                               tpu_mlir=toolchain)
    static, dynamic = reports["static"], reports["dynamic"]
    assert "dynamic prefill" in dynamic.backend and "dynamic" not in static.backend
    assert dynamic.passed, dynamic.to_json()
    assert [t.onnx_tokens for t in dynamic.turns] == [t.onnx_tokens for t in static.turns]
    # both prefills shorter than L: forward_dynamic at 5 rows (block_i), then at the new turn's rows (block_kv_i)
    assert [t.new_tokens for t in dynamic.turns] == [t.new_tokens for t in static.turns]
    assert dynamic.turns[0].new_tokens == 5 and 1 < dynamic.turns[1].new_tokens < L
    np.testing.assert_allclose([s.cosine for s in dynamic.steps], [s.cosine for s in static.steps], atol=1e-4)
    assert dynamic.mask_check["tokens"] == static.mask_check["tokens"]  # the F16 mask pattern too
