"""tpugraph serve in a test: uvicorn serving an app in a thread the test owns, and the real openai client on it."""

from __future__ import annotations

import threading
import time

import openai

from tpugraph.serving.server import listen


class ServerThread:
    """uvicorn serving ``app`` on a free port of 127.0.0.1, in a thread; ``stop`` shuts it down (lifespan too)."""

    def __init__(self, app):
        import uvicorn

        self.sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def client(url: str, **kw) -> openai.OpenAI:
    """The openai client on ``url``, without retries (a 503 must reach the test)."""
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, **kw)


def streamed(stream) -> tuple[str, list]:
    """(the text, the chunks) of a streamed chat or completion."""
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta") else c.choices[0].text
                   for c in chunks if c.choices)
    return text, chunks
