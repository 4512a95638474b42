"""tpugraph serve --backend bmodel: one round trip through the OpenAI API to a tiny compiled bmodel on tpu-mlir's
cmodel (F16, SEQ 16, a 3-token streamed chat reply), answering what onnxruntime answers."""

from __future__ import annotations

import pytest
from conftest import TINY_LLAMA, build_model_dir, save_word_tokenizer
from serve_harness import ServerThread, client, streamed

from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.runtime.text import run_prompt
from tpugraph.serving.engine import Engine
from tpugraph.serving.openai_app import create_app

pytestmark = pytest.mark.slow

SEQ = 16
CHAT_TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_serve_streams_the_bmodels_chat_reply(tmp_path, toolchain):
    model_dir = build_model_dir(tmp_path / "model", "llama", **TINY_LLAMA)
    save_word_tokenizer(model_dir, TINY_LLAMA["vocab_size"], CHAT_TEMPLATE)
    out = tmp_path / "out"
    export_and_optimize(str(model_dir), out, ExportOptions(seq_length=SEQ))
    report = compile_segments(out, toolchain, CompileOptions(quantize="f16", check="none"), jobs=2)
    expected = run_prompt(out, prompt="w10 w20", chat=True, max_new_tokens=3)  # onnxruntime, greedy
    engine = Engine.open(out, "bmodel", report.bmodel, toolchain, max_queue=2)
    assert engine.backend_name.startswith("bmodel on the cmodel")
    server = ServerThread(create_app(engine, "tiny"))
    try:
        text, chunks = streamed(client(server.url, timeout=300).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "w10 w20"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True}))
    finally:
        server.stop()
    assert text == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.tokens)
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_ids)
