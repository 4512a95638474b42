"""An interactive multi-turn chat over OUT's nets (tpugraph chat): the chat template around each user turn, the
conversation's KV cache kept between turns, each turn prefilling only its new tokens (block_kv_i)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..contract.manifest import read_manifest
from ..errors import EXIT_USAGE, TpugraphError, UsageError, VerificationError
from ..source.tokenizer import load_output_tokenizer
from .conversation import ChatConversation, KvCache, PrefillUnsupported
from .loop import SegmentRuntime
from .text import TextFn, TextStream, stop_ids, stop_reason


class ConversationFull(TpugraphError):
    """The conversation no longer fits the output's window (SEQ), or its nets cannot take the new turn; the
    session is unchanged and stays usable (``/reset``)."""

    exit_code = EXIT_USAGE


@dataclass
class ChatReply:
    text: str
    tokens: list[int]
    stop: str  # eos | max-new-tokens | window-full
    conversation_tokens: int  # the conversation (template included) this reply was generated for
    prefilled: int  # of those, prefilled this turn (the rest came from the KV cache)
    seconds: float


class ChatSession:
    """One conversation with OUT: ``ask`` a user turn, ``reset`` to start over, ``close`` when done."""

    def __init__(self, out: str | Path, backend: str = "onnx", bmodel: str | Path | None = None,
                 venv: str | Path | None = None, max_new_tokens: int = 256):
        from .backends.choice import open_backend

        out_dir = Path(out)
        manifest = read_manifest(out_dir)
        if not manifest.complete:
            raise VerificationError(f"'{out_dir}' is an unfinished export (manifest marked incomplete); rerun the export")
        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
        self.tokenizer = load_output_tokenizer(
            out_dir, manifest, instead=f"a chat needs one ('tpugraph run {out_dir} --prompt-ids 1,2,3' does not)")
        self.conversation = ChatConversation(self.tokenizer)
        self.eos = stop_ids(out_dir, manifest, self.tokenizer)
        self.max_new_tokens = max_new_tokens
        self.runtime = SegmentRuntime(out_dir, manifest, backend=open_backend(backend, out_dir, manifest, bmodel, venv))
        self.cache = KvCache()
        self.out_dir, self.manifest = out_dir, manifest
        from .vision import VisionConfig

        self.vision = VisionConfig.of(manifest)
        self.images: list = []  # the conversation's images so far (runtime.images.ProcessedImage), in order
        self.pending: list = []  # attached (/image) for the next user turn

    def attach(self, image: str | Path) -> int:
        """Read ``image`` through OUT's image processor for the next user turn (a text-only output, a missing or
        unreadable file: UsageError, the session unchanged). Returns the images now waiting for that turn."""
        from .images import load_images

        self.pending += load_images(self.out_dir, self.manifest, [image])
        return len(self.pending)

    @property
    def seq(self) -> int:
        return self.runtime.seq

    def ask(self, text: str, on_text: TextFn | None = None) -> ChatReply:
        """Answer a user turn (with the images attached since the last one, first); ConversationFull (the session
        unchanged) when it does not fit."""
        images = self.images + self.pending
        if self.pending:
            from .images import image_chat_messages

            self.conversation.messages += image_chat_messages(text, len(self.pending))
        else:
            self.conversation.add_user_turn(text)
        try:
            ids = self._prompt_ids(images)
        except UsageError as exc:
            self.conversation.messages.pop()
            raise ConversationFull(f"{exc}: /reset to start a new one") from None
        room = self.seq - len(ids) + 1  # tokens that can still be generated (the last one is never fed back)
        if room < 1:
            self.conversation.messages.pop()
            raise ConversationFull(f"the conversation would take {len(ids)} tokens and the window holds SEQ={self.seq}: "
                                   "/reset to start a new one")
        stream = TextStream(self.tokenizer, on_text)
        t0 = time.perf_counter()
        try:
            merged = None
            if images:  # every image of the conversation through the vit again (its rows tell what the cache holds)
                from .vision import encode_images

                merged = encode_images(self.runtime, ids, images, self.vision)
            reused = self.runtime.reusable_prefix(self.cache, ids, merged)
            trace = self.runtime.generate(ids, min(self.max_new_tokens, room), self.eos, on_token=stream,
                                          cache=self.cache, image=merged)
        except PrefillUnsupported as exc:
            self.conversation.messages.pop()
            raise ConversationFull(f"this output cannot take the turn: {exc}") from None
        self.images, self.pending = images, []
        self.conversation.add_reply(trace.tokens, self.eos)
        reply = stream.finish(trace.tokens) or ""
        return ChatReply(text=reply, tokens=trace.tokens, stop=stop_reason(trace.tokens, self.eos, self.max_new_tokens),
                         conversation_tokens=len(ids), prefilled=len(ids) - reused,
                         seconds=time.perf_counter() - t0)

    def _prompt_ids(self, images: list) -> list[int]:
        """The conversation's ids: a vision-language output's as its processor makes them with the images."""
        if self.vision is None:
            return self.conversation.prompt_ids()
        from .images import image_messages_ids

        return image_messages_ids(self.tokenizer, self.conversation.messages, self.vision, images, self.seq)

    def reset(self) -> None:
        self.conversation.reset()
        self.cache.reset()
        self.images, self.pending = [], []

    def close(self) -> None:
        self.runtime.close()
