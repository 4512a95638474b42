"""Text in, text out: OUT's tokenizer and chat template around the runtime's greedy loop (tpugraph run)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..contract.manifest import Manifest, read_manifest
from ..errors import UsageError, VerificationError
from ..source.tokenizer import TOKENIZER_DIR, load_output_tokenizer
from .loop import SegmentRuntime
from .sampling import SamplingParams, sample_head_of

log = logging.getLogger(__name__)

TextFn = Callable[[str], None]


@dataclass
class RunResult:
    prompt_ids: list[int]
    tokens: list[int]
    text: str | None  # None without a tokenizer (--prompt-ids)
    backend: str
    stop: str  # eos | max-new-tokens | window-full
    prefill_seconds: float
    decode_tokens_per_second: float | None
    eos_ids: list[int] = field(default_factory=list)
    sampling: dict | None = None  # temperature, top_p, top_k, penalty, seed, head; None: greedy

    def to_json(self) -> dict:
        return dict(self.__dict__)


def encode_prompt(tokenizer, text: str, chat: bool, image: bool = False, images: int = 0) -> list[int]:
    """``images`` (``image``: one): the user turn holds that many images first (structured content for the chat
    template)."""
    if not chat:
        return [int(t) for t in tokenizer(text)["input_ids"]]
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("--chat needs a chat template, and this model's tokenizer has none: drop --chat")
    from .images import image_chat_messages

    images = max(images, int(image))
    messages = image_chat_messages(text, images) if images else [{"role": "user", "content": text}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def stop_ids(out_dir: Path, manifest: Manifest, tokenizer=None) -> set[int]:
    """EOS of the config, of the copied generation_config.json (a chat model's end of turn) and the tokenizer's."""
    ids: set[int] = set()

    def add(value) -> None:
        if value is None:
            return
        for v in value if isinstance(value, (list, tuple)) else [value]:
            ids.add(int(v))

    add(manifest.model.eos_token_id)
    record = manifest.model.tokenizer
    gen = out_dir / ((record and record.dir) or TOKENIZER_DIR) / "generation_config.json"
    if record and "generation_config.json" in record.files and gen.is_file():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated integers (got '{text}')") from None
    if not ids:
        raise UsageError("--prompt-ids is empty")
    return ids


class TextStream:
    """Token ids -> the new text as it comes (``on_text``), waiting for whole UTF-8 characters; ids as
    numbers without a tokenizer."""

    def __init__(self, tokenizer, on_text: TextFn | None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.tokens: list[int] = []
        self.shown = ""

    def __call__(self, token: int) -> None:
        if self.on_text is None:
            return
        if self.tokenizer is None:
            self.on_text(f"{token} ")
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(self.shown):  # wait for a whole UTF-8 character
            self.on_text(text[len(self.shown):])
            self.shown = text

    def finish(self, tokens: list[int]) -> str | None:
        """The whole text of ``tokens`` (None without a tokenizer), its unshown end passed on first."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        if self.on_text and text is not None and len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
        return text


def stop_reason(tokens: list[int], eos: set[int], max_new_tokens: int) -> str:
    return "eos" if tokens[-1] in eos else ("max-new-tokens" if len(tokens) >= max_new_tokens else "window-full")


def run_prompt(out: str | Path, prompt: str | None = None, prompt_ids: list[int] | None = None, chat: bool = False,
               max_new_tokens: int = 64, backend: str = "onnx", bmodel: str | Path | None = None,
               venv: str | Path | None = None, on_text: TextFn | None = None,
               sampling: SamplingParams | None = None, image=None,
               lora: str | Path | None = None) -> RunResult:
    """Generate from OUT with the chosen backend, greedily or (``sampling``) drawing from OUT's sample head;
    ``on_text`` gets each new piece of text as it comes. ``image``: an image file, or a list of them, for a
    vision-language output (runtime/images.py): at the prompt's image placeholders in order, or in front of the
    prompt when it has none, each through the vit in turn. ``lora``: a PEFT LoRA adapter folder
    fed to the blocks' LoRA inputs of an export with --lora-max-rank (without it: zeros, the base model)."""
    from .backends.choice import open_backend

    out_dir = Path(out)
    manifest = read_manifest(out_dir)
    if not manifest.complete:
        raise VerificationError(f"'{out_dir}' is an unfinished export (manifest marked incomplete); rerun the export")
    if (prompt is None) == (prompt_ids is None):
        raise UsageError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    from .images import image_prompt_ids, load_images, text_prompt_ids
    from .vision import VisionConfig

    files = [] if image is None else [image] if isinstance(image, (str, Path)) else list(image)
    processed = load_images(out_dir, manifest, files) if files else []
    tokenizer = None
    seq = int(manifest.options.seq_length)
    vocab = int(manifest.model.vocab_size)
    vision = VisionConfig.of(manifest)
    if prompt is not None:
        tokenizer = load_output_tokenizer(out_dir, manifest)
        if vision is not None:  # the ids the model's processor makes of the text and its images
            ids = text_prompt_ids(tokenizer, prompt, chat, vision, processed, seq)
        else:
            ids = encode_prompt(tokenizer, prompt, chat)
    else:
        if chat:
            raise UsageError("--chat applies to --prompt TEXT, not to --prompt-ids")
        ids = list(prompt_ids)
        if vision is not None:
            ids = image_prompt_ids(ids, vision, processed, seq)
    if len(ids) > seq:
        raise UsageError(f"the prompt is {len(ids)} tokens, longer than this output's SEQ={seq} "
                         "(export with a larger --seq-length)")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise UsageError(f"token id(s) {bad[:5]} outside the vocabulary (0..{vocab - 1})")
    from .conversation import check_conversation

    check_conversation(manifest, len(ids), 1)
    eos = stop_ids(out_dir, manifest, tokenizer)
    if sampling is not None:  # refuse before a backend starts: an output without a sample head is one line
        sample_head_of({s.name for s in manifest.segments}, out_dir)
    adapter = None
    if lora is not None:  # read and checked before a backend starts
        from ..source.lora import read_adapter

        adapter = read_adapter(lora)
    engine = open_backend(backend, out_dir, manifest, bmodel, venv)
    try:
        runtime = SegmentRuntime(out_dir, manifest, backend=engine, sampling=sampling, lora=adapter)
    except BaseException:
        engine.close()
        raise
    stream = TextStream(tokenizer, on_text)
    try:
        merged = None
        if processed:
            from .vision import encode_images

            merged = encode_images(runtime, ids, processed, vision)
        trace = runtime.generate(ids, max_new_tokens, eos, on_token=stream, image=merged)
    finally:
        runtime.close()
    stop = stop_reason(trace.tokens, eos, max_new_tokens)
    text = stream.finish(trace.tokens)
    return RunResult(prompt_ids=ids, tokens=trace.tokens, text=text, backend=engine.name, stop=stop,
                     prefill_seconds=trace.prefill_seconds,
                     decode_tokens_per_second=trace.decode_tokens_per_second, eos_ids=sorted(eos),
                     sampling=None if sampling is None else {
                         "head": runtime.sample_net, "temperature": sampling.temperature, "top_p": sampling.top_p,
                         "top_k": sampling.top_k, "penalty": sampling.penalty, "seed": sampling.seed})
