"""tpugraph chat: the chat template around each turn, the KV cache kept between turns (each turn prefills only its
new tokens with block_kv_i), /reset, EOS, and a polite refusal when the window is full; verify --turns with a
chat template."""

from __future__ import annotations

import pytest
from conftest import TINY_LLAMA, build_model_dir, save_word_tokenizer
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import hf_greedy, verify
from tpugraph.runtime.chat import ChatSession, ConversationFull
from tpugraph.runtime.conversation import apply_chat_template

SEQ = 64
L = 16
ROLE_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
runner = CliRunner()


def save_chat_tokenizer(folder, vocab_size: int) -> None:
    save_word_tokenizer(folder, vocab_size, ROLE_TEMPLATE)


def export_chat_model(root, seq: int = SEQ, **options):
    model_dir = build_model_dir(root / "model", "llama", **TINY_LLAMA)
    save_chat_tokenizer(model_dir, TINY_LLAMA["vocab_size"])
    out = root / "out"
    export_and_optimize(str(model_dir), out, ExportOptions(seq_length=seq, **options))
    return model_dir, out


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    return export_chat_model(tmp_path_factory.mktemp("chat"), max_input_length=L, history_kv=True)


def test_each_turn_answers_like_transformers_on_the_whole_conversation(chatty):
    from transformers import AutoTokenizer

    model_dir, out = chatty
    tok = AutoTokenizer.from_pretrained(model_dir)
    session = ChatSession(out, max_new_tokens=6)
    messages = []
    try:
        for turn, text in enumerate(["w10 w20 w30", "w40 w41", "w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20"]):
            messages.append({"role": "user", "content": text})
            ids = apply_chat_template(tok, messages)
            pieces: list[str] = []
            reply = session.ask(text, on_text=pieces.append)
            assert reply.tokens == hf_greedy(model_dir, ids, 6, {TINY_LLAMA["eos_token_id"]})[0]
            assert reply.conversation_tokens == len(ids) and "".join(pieces) == reply.text
            if turn:
                assert reply.prefilled < len(ids)  # the history came from the KV cache
            messages.append({"role": "assistant", "content": reply.text})
        session.reset()
        again = session.ask("w10 w20 w30")
        assert again.prefilled == again.conversation_tokens  # nothing cached after /reset
    finally:
        session.close()


def test_chat_command_resets_and_refuses_politely_when_the_window_is_full(tmp_path):
    model_dir, out = export_chat_model(tmp_path, seq=24, max_input_length=8, history_kv=True)
    long_turn = " ".join(f"w{i}" for i in range(10, 30))  # 20 words: with the template more than fits after a turn
    res = runner.invoke(app, ["chat", str(out), "--max-new-tokens", "3"],
                        input=f"w10 w20\n{long_turn}\n/reset\nw10 w20\n/exit\nw1\n")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[2] == "sorry: the conversation would take 29 tokens and the window holds SEQ=24: /reset to start a new one"
    assert lines[3] == "[conversation reset]"
    # the same first turn before and after /reset: the same reply, all of it prefilled both times; /exit ends
    assert lines[0] == lines[4] and lines[0].count("w") == 3
    for stats in (lines[1], lines[5]):
        assert stats.startswith("[3 tokens, stop: max-new-tokens; conversation 4 of 24 tokens, 4 prefilled this turn;")
    assert len(lines) == 6


def test_chat_needs_a_tokenizer_with_a_template(tmp_path):
    export_and_optimize("tiny-llama", tmp_path / "out", ExportOptions(seq_length=16))
    res = runner.invoke(app, ["chat", str(tmp_path / "out")], input="hi\n")
    assert res.exit_code == 2 and res.output.strip().startswith("error: ") and "tokenizer" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_turn_that_does_not_fit_leaves_the_session_usable(tmp_path):
    _, out = export_chat_model(tmp_path, seq=16)  # no --history-kv: every turn re-prefills the conversation
    session = ChatSession(out, max_new_tokens=2)
    try:
        first = session.ask("w10 w20")
        with pytest.raises(ConversationFull, match="SEQ=16"):
            session.ask(" ".join(f"w{i}" for i in range(10, 30)))
        assert len(session.conversation.messages) == 2  # the refused turn is not kept
        second = session.ask("w30")
        assert second.prefilled == second.conversation_tokens > first.conversation_tokens
    finally:
        session.close()


def test_verify_turns_uses_the_chat_template(chatty):
    _, out = chatty
    report = verify(out, new_tokens=4, turns=3)
    assert report.passed, report.to_json()
    sizes = [t.prompt_tokens for t in report.turns]
    assert sizes[0] < sizes[1] < sizes[2]
    assert all(t.new_tokens < t.prompt_tokens for t in report.turns[1:])
