"""tpugraph serve's door: check the `serve` extra, listen, open OUT's engine and run uvicorn until Ctrl-C."""

from __future__ import annotations

import signal

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UsageError

EXTRA_HINT = "pip install tpugraph[serve]"


def require_serve_extra() -> None:
    """A UsageError naming the install command when FastAPI or uvicorn is missing."""
    missing = []
    for module in ("fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(f"tpugraph serve needs {' and '.join(missing)} (the serve extra): {EXTRA_HINT}")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket for uvicorn, or a UsageError saying why not; port 0 takes a free one."""
    if not 0 <= port <= 65535:
        raise UsageError(f"must be within 0..65535 (got {port})", option="port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # clients queue in the backlog until uvicorn accepts (uvicorn's own default backlog)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class Listening:
    url: str  # http://host:port/v1, what a client's base_url is
    model: str
    backend: str
    seq: int
    max_queue: int


def serve(out: str | Path, backend: str = "onnx", bmodel: str | Path | None = None, venv: str | Path | None = None,
          host: str = "127.0.0.1", port: int = 8000, max_queue: int = 16, model_name: str | None = None,
          on_listening: Callable[[Listening], None] | None = None) -> None:
    """Serve OUT over OpenAI's HTTP API until interrupted (uvicorn stops on SIGINT/SIGTERM, the engine closes)."""
    require_serve_extra()
    import uvicorn

    class InterruptAware(uvicorn.Server):
        """uvicorn's server, remembering whether a Ctrl-C (SIGINT) stopped it."""

        interrupted = False

        def handle_exit(self, sig, frame) -> None:
            self.interrupted = self.interrupted or sig == signal.SIGINT
            super().handle_exit(sig, frame)

    from .engine import Engine
    from .openai_app import create_app

    sock = listen(host, port)
    try:
        engine = Engine.open(out, backend, bmodel, venv, max_queue)
    except BaseException:
        sock.close()
        raise
    app = create_app(engine, model_name)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if on_listening:
        on_listening(Listening(f"http://{shown}:{bound}/v1", model_name or Path(out).resolve().name,
                               engine.backend_name, engine.seq, max_queue))
    server = InterruptAware(uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
        # uvicorn re-raises a captured Ctrl-C after its shutdown, but asyncio's runner can swallow it (the task ends
        # before the cancel lands): exit as every command does on Ctrl-C (130), whichever way the run ended
        if server.interrupted:
            raise KeyboardInterrupt
    finally:
        sock.close()
        engine.close()  # the lifespan's shutdown closed it already, unless uvicorn never started
