"""serve: OUT behind an OpenAI-compatible HTTP API (the `serve` extra: FastAPI and uvicorn)."""

from __future__ import annotations

from typing import Optional

import typer

from .app import app, user_errors
from .options import Backend, BmodelFile, OutFolder, TpuMlirVenv


@app.command("serve")
@user_errors
def serve_cmd(
    out: OutFolder,
    backend: Backend = "onnx",
    bmodel: BmodelFile = None,
    tpu_mlir: TpuMlirVenv = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free one, printed at start)."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait for the device; one more is answered 503."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id /v1/models lists (default: OUT's folder name)."),
) -> None:
    """Serve OUT over OpenAI's HTTP API (/v1/models, /v1/chat/completions, /v1/completions, streamed or not) until
    Ctrl-C. One device runs one request at a time: the others wait in a FIFO queue; the KV cache stays between
    requests, so with --history-kv a conversation's next turn prefills only its new tokens."""
    from ..serving.server import serve

    def announce(at) -> None:
        typer.echo(f"serving {out} as '{at.model}' on {at.url} ({at.backend}, SEQ={at.seq}, queue {at.max_queue}); "
                   "Ctrl-C stops", err=True)

    serve(out, backend=backend, bmodel=bmodel, venv=tpu_mlir, host=host, port=port, max_queue=max_queue,
          model_name=model_name, on_listening=announce)
