"""The real SmolLM2-135M-Instruct with --history-kv in onnxruntime: a 3-turn chat through its own chat template
(each turn prefilling only its new tokens on the KV history, prompts longer than L in chunks) answers token for
token like transformers on the whole conversation, and `tpugraph chat` keeps the history between turns.

Needs $TPUGRAPH_SMOLLM2 (the folder scripts/make_smollm2.py wrote); skipped with the reason otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify
from tpugraph.runtime.chat import ChatSession

pytestmark = pytest.mark.slow

SEQ = 128
L = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    folder = os.environ.get("TPUGRAPH_SMOLLM2")
    if not folder or not (Path(folder) / "config.json").is_file():
        pytest.skip("$TPUGRAPH_SMOLLM2 does not name a model folder: build one with "
                    "scripts/make_smollm2.py DIR and export TPUGRAPH_SMOLLM2=DIR")
    out = tmp_path_factory.mktemp("smollm2-kv") / "out"
    export_and_optimize(folder, out, ExportOptions(seq_length=SEQ, max_input_length=L, history_kv=True, jobs=2))
    return out


def test_three_chat_turns_answer_like_transformers(exported):
    report = verify(exported, new_tokens=8, turns=3)
    assert report.passed, report.to_json()
    first = report.turns[0]
    assert first.prompt_tokens > 2 * L  # the system prompt and question: prefilled in chunks of L
    for turn in report.turns[1:]:
        assert turn.new_tokens < turn.prompt_tokens // 2  # the history came from the KV cache


def test_chat_session_keeps_the_conversation(exported):
    from tpugraph.proof.verify import hf_greedy
    from tpugraph.runtime.conversation import apply_chat_template

    session = ChatSession(exported, max_new_tokens=24)
    try:
        first = session.ask("What is the capital of France?")
        assert first.text.strip() == "The capital of France is Paris." and first.stop == "eos"
        second = session.ask("And of Italy?")
        assert second.prefilled < second.conversation_tokens // 2
        ids = apply_chat_template(session.tokenizer, session.conversation.messages[:-1])
        assert len(ids) == second.conversation_tokens
        assert second.tokens == hf_greedy(os.environ["TPUGRAPH_SMOLLM2"], ids, 24, session.eos)[0]
    finally:
        session.close()
