"""A conversation over OUT's nets: its token ids turn by turn (chat template or plain ids) and the KV cache kept
between turns, for ``verify --turns`` and ``tpugraph chat``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contract.manifest import Manifest
from ..contract.segments import SegmentKind
from ..errors import UsageError
from .loop import KvCache, PrefillUnsupported, prefill_length  # noqa: F401 - re-exported

# The user turns of a verified chat conversation (verify --turns with a chat template), cycled.
VERIFY_USER_TURNS = ("What is the capital of France?", "And the capital of Italy?",
                     "Which of the two cities is bigger?")


def runtime_facts(manifest: Manifest) -> tuple[int, int, bool]:
    """(SEQ, L, has block_kv_i) of an output, from its manifest."""
    seq = int(manifest.options.seq_length)
    length = prefill_length(manifest)
    return seq, length, SegmentKind.BLOCK_KV in manifest.kinds()


def check_conversation(manifest: Manifest, prompt_tokens: int, turns: int) -> None:
    """UsageError when the output's nets cannot take the first prompt (longer than L without block_kv_i)."""
    seq, length, history_kv = runtime_facts(manifest)
    if prompt_tokens > length and not history_kv:
        raise UsageError(f"a prompt of {prompt_tokens} tokens is longer than this output's prefill nets "
                         f"({length} tokens, --max-input-length): re-export with --history-kv to prefill it in chunks")


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


class Conversation:
    """The token ids of a conversation so far, ending with the prompt of the next reply."""

    def prompt_ids(self) -> list[int]:
        raise NotImplementedError

    def add_reply(self, tokens: list[int], eos: set[int]) -> None:
        raise NotImplementedError

    def add_user_turn(self, text: str | None = None) -> None:
        raise NotImplementedError

    def longest(self, turns: int, new_tokens: int) -> int | None:
        """The most tokens ``turns`` turns of ``new_tokens`` replies can take (the last reply's final token
        never enters the window), when known before they are generated."""
        return None

    @staticmethod
    def for_verify(out_dir: Path, manifest: Manifest, prompt: list[int], seed: int = 0,
                   chat: bool = True) -> "Conversation":
        """With a chat template in OUT's tokenizer: chat messages (VERIFY_USER_TURNS) through the template;
        otherwise plain ids: the prompt, then each reply and a new random user prompt of the same length."""
        record = manifest.model.tokenizer
        if chat and record and record.chat_template and record.files:
            from ..source.tokenizer import load_output_tokenizer

            tokenizer = load_output_tokenizer(out_dir, manifest)
            if getattr(tokenizer, "chat_template", None):
                return ChatConversation(tokenizer, VERIFY_USER_TURNS)
        return IdsConversation(prompt, int(manifest.model.vocab_size), seed)


class IdsConversation(Conversation):
    """No template: the conversation is the concatenation of the user prompts and the replies' tokens."""

    def __init__(self, prompt: list[int], vocab: int, seed: int = 0):
        self.ids = list(prompt)
        self.turn_length = len(prompt)
        self.vocab = vocab
        self.rng = np.random.default_rng(seed + 1)

    def prompt_ids(self) -> list[int]:
        return list(self.ids)

    def add_reply(self, tokens: list[int], eos: set[int]) -> None:
        self.ids += list(tokens)

    def add_user_turn(self, text: str | None = None) -> None:
        self.ids += self.rng.integers(3, self.vocab, size=self.turn_length).tolist()

    def longest(self, turns: int, new_tokens: int) -> int | None:
        return len(self.ids) + (turns - 1) * self.turn_length + turns * new_tokens - 1


class ChatConversation(Conversation):
    """Messages rendered by the tokenizer's chat template; a reply goes back as the assistant's text."""

    def __init__(self, tokenizer, user_turns: tuple[str, ...] = ()):
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("a chat needs a chat template, and this model's tokenizer has none")
        self.tokenizer = tokenizer
        self.user_turns = user_turns
        self.messages: list[dict] = []
        if user_turns:
            self.add_user_turn()

    def prompt_ids(self) -> list[int]:
        return apply_chat_template(self.tokenizer, self.messages)

    def add_reply(self, tokens: list[int], eos: set[int]) -> None:
        text = self.tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})

    def add_user_turn(self, text: str | None = None) -> None:
        if text is None:
            asked = sum(m["role"] == "user" for m in self.messages)
            text = self.user_turns[asked % len(self.user_turns)]
        self.messages.append({"role": "user", "content": text})

    def reset(self) -> None:
        self.messages = []
