"""OpenAI's request bodies (the fields tpugraph serve honours) and response objects, as the openai client reads them."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from .engine import Finished


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both endpoints take. temperature absent or 0: greedy (as tpugraph run); > 0: OUT's sample head."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    # Not OpenAI's, as vLLM takes them (the openai client's extra_body): the sample head's other inputs.
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        kinds = {p.type for p in self.content} - {"text"}
        if kinds:
            raise ValueError(f"message content of type {', '.join(sorted(kinds))} is not supported (text only)")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def finish_reason(done: Finished) -> str:
    """OpenAI's names: a cancelled job is answered to nobody; an error never gets here."""
    return done.finish_reason if done.finish_reason in ("stop", "length") else "stop"


Kind = Literal["chat", "completion"]


class Reply:
    """The response objects of one request, streamed (chunks) or whole."""

    def __init__(self, kind: Kind, model: str):
        self.kind = kind
        self.model = model
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())

    def _object(self, name: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def whole(self, done: Finished) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                      "finish_reason": finish_reason(done), "logprobs": None}
            return self._object("chat.completion", [choice], usage=usage(done))
        choice = {"index": 0, "text": done.text, "finish_reason": finish_reason(done), "logprobs": None}
        return self._object("text_completion", [choice], usage=usage(done))

    def chunk(self, text: str | None = None, done: Finished | None = None, first: bool = False) -> dict:
        reason = finish_reason(done) if done is not None else None
        if self.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return self._object("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return self._object("text_completion", [choice])

    def usage_chunk(self, done: Finished) -> dict:
        name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._object(name, [], usage=usage(done))


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
