"""The HTTP layer: OpenAI's endpoints on FastAPI over an Engine. Handlers turn a request into prompt ids and checked
parameters, queue it and relay what the engine's worker emits (whole, or as server-sent events); they never touch
the backend. Every error is OpenAI's {"error": {"message", "type", "param", "code"}}; a malformed body is 400."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..runtime.conversation import apply_chat_template
from ..runtime.text import encode_prompt
from .engine import Engine, Finished, GenerationRequest, PromptTooLong, QueueFull, RequestRefused
from .protocol import ChatCompletionRequest, CompletionRequest, Reply, SamplingFields, error_body

log = logging.getLogger(__name__)

# How often a handler waiting for the device checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.25


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, code, param)


def refused(exc: RequestRefused) -> ApiError:
    return ApiError(400, str(exc), code="context_length_exceeded" if isinstance(exc, PromptTooLong) else
                    "invalid_request")


def create_app(engine: Engine, model_name: str | None = None) -> FastAPI:
    """The server's app; its lifespan starts the engine's worker and closes the engine at shutdown."""
    model = model_name or engine.out_dir.resolve().name

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="tpugraph serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON: {first.get('msg', '')}",
                                           "invalid_request_error", "invalid_json"), status_code=400)
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", where or None),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "tpugraph"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if not getattr(engine.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        try:
            ids = apply_chat_template(engine.tokenizer, messages)
        except Exception as exc:  # the template's own refusal (roles out of order...)
            raise ApiError(400, f"the chat template rejects these messages: {exc}", param="messages") from None
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _answer(Reply("chat", model), ids, limit, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (a list of prompts is not supported)", param="prompt")
            prompt = prompt[0]
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        ids = encode_prompt(engine.tokenizer, prompt, chat=False) if isinstance(prompt, str) else list(prompt)
        return await _answer(Reply("completion", model), ids, body.max_tokens, body, request)

    async def _answer(reply: Reply, ids: list[int], max_tokens: int | None, body: SamplingFields,
                      request: Request):
        if body.n != 1:
            raise ApiError(400, "n must be 1 (one device answers one choice)", param="n")
        if body.presence_penalty or body.frequency_penalty:
            raise ApiError(400, "presence_penalty and frequency_penalty are not supported: use repetition_penalty "
                                "(the sample head's)", param="presence_penalty")
        try:
            tokens = engine.check_prompt(ids, max_tokens)
            sampling = engine.sampling(body.temperature, body.top_p, body.seed, body.top_k, body.repetition_penalty)
        except RequestRefused as exc:
            raise refused(exc) from None
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            job = engine.submit(GenerationRequest(ids, tokens, sampling, body.stop_strings()),
                                lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except QueueFull as exc:
            raise ApiError(503, str(exc), "server_error", "queue_full") from None

        if not body.stream:
            async def next_event():
                """The job's next event; the job cancelled when the client went away meanwhile (a stream's
                client is watched by the StreamingResponse, which cancels the stream)."""
                while True:
                    try:
                        return await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancel()
                            raise ApiError(499, "the client closed the request", code="client_closed") from None

            try:
                while not isinstance(event := await next_event(), Finished):
                    pass
            finally:
                job.cancel()  # a no-op once finished; stops the device if this handler was cancelled
            if event.error is not None:
                raise ApiError(500, f"the device failed: {event.error}", "server_error", "device_error")
            return reply.whole(event)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream():
            try:
                yield sse(reply.chunk(first=True))
                while not isinstance(event := await events.get(), Finished):
                    yield sse(reply.chunk(event))
                if event.error is not None:
                    yield sse(error_body(f"the device failed: {event.error}", "server_error", "device_error"))
                else:
                    yield sse(reply.chunk(done=event))
                    if include_usage:
                        yield sse(reply.usage_chunk(event))
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # the client gone (or done): the device stops at its next token

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def sse(value: dict) -> str:
    return f"data: {json.dumps(value)}\n\n"
