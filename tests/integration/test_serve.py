"""tpugraph serve: OpenAI's HTTP API over a tiny exported chat model, driven by the real openai client. The answers
are tpugraph run's; one device serves one request at a time behind a bounded FIFO queue (full: 503); a prompt
that cannot fit is a 400; a client gone mid-stream frees the device; a conversation's next turn reuses the KV cache.

The server runs in a uvicorn thread this module owns, over a backend the test can hold (a gate) or slow down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import TINY_LLAMA, build_model_dir, save_word_tokenizer
from serve_harness import ServerThread, client, streamed

from tpugraph.errors import UsageError
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.runtime.backends.onnxruntime_backend import OnnxBackend
from tpugraph.runtime.conversation import apply_chat_template
from tpugraph.runtime.text import run_prompt
from tpugraph.serving.engine import Engine
from tpugraph.serving.openai_app import create_app
from tpugraph.serving.server import listen

SEQ = 64
L = 16
MAX_QUEUE = 8
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MODEL = "tiny-chat"


class HeldBackend:
    """OUT's onnxruntime backend, each net run waiting for ``gate`` and then ``delay`` seconds: the test decides
    how busy the device is."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0

    def run(self, net, *arrays):
        self.gate.wait()
        if self.delay:
            time.sleep(self.delay)
        return self.inner.run(net, *arrays)

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(OUT, the engine, its held backend, the server's base URL): a tiny Llama with a word tokenizer and a chat
    template, SEQ 64, L 16, --history-kv and a sample head."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = build_model_dir(root / "model", "llama", **TINY_LLAMA)
    save_word_tokenizer(model_dir, TINY_LLAMA["vocab_size"], CHAT_TEMPLATE)
    out = root / "out"
    export_and_optimize(str(model_dir), out, ExportOptions(seq_length=SEQ, max_input_length=L, history_kv=True,
                                                          sample_head="current"))
    from tpugraph.contract.manifest import read_manifest

    manifest = read_manifest(out)
    backend = HeldBackend(OnnxBackend(out, manifest))
    engine = Engine(out, backend, max_queue=MAX_QUEUE, manifest=manifest)
    server = ServerThread(create_app(engine, MODEL))
    yield out, engine, backend, server.url
    backend.gate.set()
    server.stop()
    assert not engine._worker.is_alive()  # the lifespan's shutdown closed the engine


FINISH = {"eos": "stop", "max-new-tokens": "length", "window-full": "length"}


def test_models_lists_the_output(served):
    *_, url = served
    assert [m.id for m in client(url).models.list()] == [MODEL]


@pytest.mark.parametrize("prompt", ["w10 w20 w30", "w7 w8"])
def test_chat_answers_what_run_answers_streamed_or_not(served, prompt):
    out, _, _, url = served
    expected = run_prompt(out, prompt=prompt, chat=True, max_new_tokens=8)
    api = client(url)
    messages = [{"role": "user", "content": prompt}]
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == FINISH[expected.stop]
    assert whole.usage.prompt_tokens == len(expected.prompt_ids)
    assert whole.usage.completion_tokens == len(expected.tokens)
    assert whole.usage.total_tokens == len(expected.prompt_ids) + len(expected.tokens)
    text, chunks = streamed(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                                        stream_options={"include_usage": True}))
    assert text == expected.text and len(chunks) > 3  # streamed piece by piece, not at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == FINISH[expected.stop]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.tokens)


def test_completions_answer_what_run_answers_streamed_or_not(served):
    out, _, _, url = served
    expected = run_prompt(out, prompt="w3 w4 w5", max_new_tokens=10)
    api = client(url)
    whole = api.completions.create(model=MODEL, prompt="w3 w4 w5", max_tokens=10)
    assert whole.choices[0].text == expected.text and whole.choices[0].finish_reason == FINISH[expected.stop]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(expected.prompt_ids),
                                                                          len(expected.tokens))
    text, _ = streamed(api.completions.create(model=MODEL, prompt="w3 w4 w5", max_tokens=10, stream=True))
    assert text == expected.text
    by_ids = api.completions.create(model=MODEL, prompt=expected.prompt_ids, max_tokens=10)
    assert by_ids.choices[0].text == expected.text


def test_stop_strings_are_cut_from_the_text(served):
    *_, url = served
    api = client(url)
    full = api.completions.create(model=MODEL, prompt="w9 w9", max_tokens=12)
    words = full.choices[0].text.split()
    assert len(words) >= 4, full  # the greedy reply needs a few words to stop inside
    stop = " " + words[2]
    cut = full.choices[0].text[: full.choices[0].text.index(stop)]
    for stream in (False, True):
        reply = api.completions.create(model=MODEL, prompt="w9 w9", max_tokens=12, stop=[stop, "never"],
                                       stream=stream)
        text = streamed(reply)[0] if stream else reply.choices[0].text
        assert text == cut
    reply = api.completions.create(model=MODEL, prompt="w9 w9", max_tokens=12, stop=stop)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < full.usage.completion_tokens  # generation stopped there


def test_sampling_goes_through_the_sample_head_and_its_seed(served):
    *_, url = served
    api = client(url)
    ask = dict(model=MODEL, prompt="w1 w2", max_tokens=12, temperature=1.5, top_p=0.95)
    first, again = (api.completions.create(**ask, seed=7).choices[0].text for _ in range(2))
    others = {api.completions.create(**ask, seed=s).choices[0].text for s in range(8, 12)}
    greedy = api.completions.create(model=MODEL, prompt="w1 w2", max_tokens=12).choices[0].text
    assert first == again  # the same seed, the same draws
    assert len(others | {first, greedy}) > 2  # other seeds draw other text
    with pytest.raises(openai.BadRequestError, match="top_p"):
        api.completions.create(model=MODEL, prompt="w1", temperature=1.0, top_p=1.5)


def test_a_conversation_reuses_the_kv_cache_and_answers_like_a_fresh_prefill(served):
    out, engine, _, url = served
    api = client(url)
    messages = [{"role": "user", "content": "w40 w41 w42"}]
    first = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "w43 w44"}]
    second = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > first.usage.prompt_tokens  # the first turn's prompt and reply came from the cache
    ids = apply_chat_template(engine.tokenizer, messages)
    fresh = run_prompt(out, prompt_ids=ids, max_new_tokens=5)
    assert second.choices[0].message.content == engine.tokenizer.decode(fresh.tokens, skip_special_tokens=True)


def test_eight_concurrent_clients_are_all_answered_correctly(served):
    out, _, _, url = served
    prompts = [f"w{10 + 7 * i} w{11 + 3 * i}" for i in range(8)]
    expected = [run_prompt(out, prompt=p, chat=True, max_new_tokens=6).text for p in prompts]

    def ask(i):
        api = client(url)
        messages = [{"role": "user", "content": prompts[i]}]
        if i % 2:
            return streamed(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True))[0]
        return api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == expected


def test_a_full_queue_answers_503_and_the_queued_requests_are_served(served):
    out, engine, backend, url = served
    backend.gate.clear()  # the device hangs on the first request's first net

    def ask(_):
        return client(url).completions.create(model=MODEL, prompt="w5", max_tokens=2).choices[0].text

    try:
        with ThreadPoolExecutor(MAX_QUEUE + 1) as pool:
            held = [pool.submit(ask, 0)]
            wait_until(lambda: engine.busy)
            held += [pool.submit(ask, i) for i in range(MAX_QUEUE)]
            wait_until(lambda: engine.waiting == MAX_QUEUE)
            with pytest.raises(openai.APIStatusError) as full:
                ask(0)
            assert full.value.status_code == 503
            error = full.value.response.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "server_error"
            assert "--max-queue" in error["message"]
            backend.gate.set()
            answers = [f.result(timeout=60) for f in held]
    finally:
        backend.gate.set()
    assert len(set(answers)) == 1 and answers[0] == run_prompt(out, prompt="w5", max_new_tokens=2).text


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_client_gone_mid_stream_frees_the_device(served):
    _, engine, backend, url = served
    api = client(url)
    messages = [{"role": "user", "content": "w60 w61"}]
    full = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=40)
    assert full.usage.completion_tokens >= 30, full  # a long reply to interrupt
    backend.delay = 0.02  # ~5 net runs a token: ~0.1 s a token, ~4 s for the whole reply
    try:
        stream = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, stream=True)
        next(c for c in stream if c.choices and c.choices[0].delta.content)
        stream.close()
        t0 = time.monotonic()
        api.completions.create(model=MODEL, prompt="w1", max_tokens=1)
        waited = time.monotonic() - t0
    finally:
        backend.delay = 0.0
    gone = engine.served[-2]
    assert gone.finish_reason == "cancelled" and gone.completion_tokens < 15
    assert waited < 2.0  # not the ~3 s the rest of the reply would have taken


def test_a_prompt_that_cannot_fit_is_a_400_with_the_reason(served):
    *_, url = served
    api = client(url)
    with pytest.raises(openai.BadRequestError) as long:
        api.completions.create(model=MODEL, prompt=" ".join(f"w{i}" for i in range(SEQ + 1)), max_tokens=2)
    error = long.value.response.json()["error"]
    assert error["code"] == "context_length_exceeded" and f"SEQ={SEQ}" in error["message"]
    assert "65 tokens" in error["message"]
    # a prompt that fits with room for fewer tokens than asked: answered, cut by the window
    reply = api.completions.create(model=MODEL, prompt=" ".join(f"w{i}" for i in range(SEQ - 2)), max_tokens=10)
    assert reply.usage.completion_tokens <= 3


def http(url, path, body: bytes | None = None):
    """(status, JSON body) of a raw request: what no client library would send."""
    request = urllib.request.Request(url + path, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_bad_requests_are_400_in_openais_shape(served):
    *_, url = served
    status, body = http(url, "/chat/completions", b'{"model": "x", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = http(url, "/chat/completions", json.dumps({"model": MODEL}).encode())
    assert status == 400 and body["error"]["param"] == "messages" and body["error"]["type"] == "invalid_request_error"
    status, body = http(url, "/completions", json.dumps({"model": MODEL, "prompt": "w1", "n": 2}).encode())
    assert status == 400 and body["error"]["param"] == "n"
    status, body = http(url, "/no/such/path")
    assert status == 404 and "error" in body


def test_serve_without_the_extra_is_one_line(tmp_path):
    code = ("import sys; sys.modules['fastapi'] = None; sys.argv = ['tpugraph', 'serve', sys.argv[1]]; "
            "from tpugraph.cli import main; main()")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         check=False, env=env)
    assert res.returncode == 2, res.stderr
    expected = "error: tpugraph serve needs fastapi (the serve extra): pip install tpugraph[serve]"
    assert res.stderr.strip().splitlines() == [expected]


def test_the_serve_command_answers_and_ctrl_c_stops_it(served):
    out, *_ = served
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "tpugraph", "serve", str(out), "--port", "0", "--model-name", "cli"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        while line and not line.startswith("serving "):
            line = proc.stderr.readline()
        assert f"serving {out} as 'cli' on http://127.0.0.1:" in line and "SEQ=64, queue 16" in line, line
        url = line.split(" on ")[1].split()[0]
        assert [m.id for m in client(url).models.list()] == ["cli"]
        assert client(url).completions.create(model="cli", prompt="w3 w4", max_tokens=3).usage.completion_tokens
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130  # Ctrl-C, as for every command (errors.py): uvicorn shut down, then re-raised it
        rest = proc.stderr.read()
        assert rest.strip().splitlines()[-1] == "interrupted" and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_a_port_in_use_is_one_line():
    taken = listen("127.0.0.1", 0)
    try:
        with pytest.raises(UsageError, match=r"cannot listen on 127\.0\.0\.1:\d+: Address already in use"):
            listen("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
