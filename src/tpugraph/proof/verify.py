"""End-to-end parity: the ONNX segments driven like the TPU runtime vs transformers' own greedy generate."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..contract.manifest import Manifest, read_manifest, validate
from ..errors import ModelError, UsageError, VerificationError
from ..runtime.loop import PrefillUnsupported, SegmentRuntime
from ..source.checkpoint import is_gguf_file, materialize_preset

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999  # per-step logits, fp32 export vs fp32 reference
MAX_REL_DIFF = 1e-3  # max |diff| / (max logit - min logit)
# (min cosine, max rel diff) per weight dtype of the export, always against the float32 reference:
# float16 keeps ~11 significant bits and bfloat16 ~8, so their logits sit that much further off.
THRESHOLDS = {"float32": (MIN_COSINE, MAX_REL_DIFF), "float16": (0.999, 1e-2), "bfloat16": (0.995, 5e-2),
              # A compiled bmodel on the cmodel: activations too are in the float type between and inside nets.
              "bmodel-f16": (0.999, 2e-2), "bmodel-bf16": (0.99, 6e-2),
              # Weight-only int8/int4 of the blocks and lm_head: the tokens are fed back (teacher forcing) and
              # the report shows how far the logits move; these bounds are what such a model must still reach.
              "bmodel-w8f16": (0.99, 0.1), "bmodel-w8bf16": (0.98, 0.15),
              "bmodel-w4f16": (0.95, 0.25), "bmodel-w4bf16": (0.95, 0.25)}
# Modes whose greedy tokens must equal transformers' token for token (no teacher forcing).
FREE_RUNNING = ("float32", "bmodel-f16", "bmodel-bf16")


@dataclass
class StepReport:
    step: int
    hf_token: int
    onnx_token: int
    cosine: float
    max_abs_diff: float
    rel_diff: float
    min_cosine: float = MIN_COSINE
    max_rel_diff: float = MAX_REL_DIFF
    # Reduced precision only: the ONNX top-1 differs, but transformers' own logits put it within the
    # dtype's error of transformers' top-1 (a near-tie), so either token is a faithful greedy choice.
    near_tie: bool = False
    turn: int = 1  # the conversation turn of the step (verify --turns)
    # False for a top-k lm_head (--lm-head-topk), which returns the token only: the step is its token alone.
    logits_compared: bool = True

    @property
    def ok(self) -> bool:
        same = self.hf_token == self.onnx_token or self.near_tie
        if not self.logits_compared:
            return self.hf_token == self.onnx_token
        return same and self.cosine >= self.min_cosine and self.rel_diff <= self.max_rel_diff


@dataclass
class VerifyReport:
    prompt: list[int]
    hf_tokens: list[int]
    onnx_tokens: list[int]
    steps: list[StepReport] = field(default_factory=list)
    dtype: str = "float32"
    backend: str = "onnxruntime"
    # float16/bfloat16: the runtime is fed transformers' tokens (teacher forcing), so one near-tie does
    # not send the two generations apart and every step's logits stay comparable.
    teacher_forced: bool = False
    reference: str = "whole"  # or "streamed": the fp32 reference's layer weights read per forward
    # A bmodel is also driven with the other mask encoding a runtime writes (see ``other_mask_value``):
    # {"pattern", "value", "tokens", "expected"}; its tokens must equal the first turn's under the contract's mask.
    mask_check: dict | None = None
    turns: list["TurnReport"] = field(default_factory=list)  # one per conversation turn (verify --turns)
    # With an image (proof/vision_verify.py): the image, its grid and tokens, and the vit output's cosine against
    # transformers' vision features ({"vit_cosine", "min_vit_cosine", ...}); None for a text prompt.
    vision: dict | None = None

    @property
    def vision_ok(self) -> bool:
        return self.vision is None or self.vision["vit_cosine"] >= self.vision["min_vit_cosine"]

    @property
    def mask_check_ok(self) -> bool:
        return self.mask_check is None or self.mask_check["tokens"] == self.mask_check["expected"]

    @property
    def thresholds(self) -> tuple[float, float]:
        return THRESHOLDS[self.dtype]

    @property
    def tokens_equal(self) -> bool:
        return self.hf_tokens == self.onnx_tokens and all(t.hf_tokens == t.onnx_tokens for t in self.turns)

    @property
    def logits_compared(self) -> bool:
        return all(s.logits_compared for s in self.steps)

    @property
    def min_cosine(self) -> float:
        return min((s.cosine for s in self.steps if s.logits_compared), default=float("nan"))

    @property
    def max_rel_diff(self) -> float:
        return max((s.rel_diff for s in self.steps if s.logits_compared), default=float("nan"))

    @property
    def max_abs_diff(self) -> float:
        return max((s.max_abs_diff for s in self.steps if s.logits_compared), default=float("nan"))

    @property
    def passed(self) -> bool:
        same_tokens = self.tokens_equal or (self.teacher_forced and len(self.hf_tokens) == len(self.onnx_tokens)
                                            and all(len(t.hf_tokens) == len(t.onnx_tokens) for t in self.turns))
        return (same_tokens and bool(self.steps) and all(s.ok for s in self.steps) and self.mask_check_ok
                and self.vision_ok)

    def to_json(self) -> dict:
        return {
            "passed": self.passed, "prompt": self.prompt, "hf_tokens": self.hf_tokens,
            "onnx_tokens": self.onnx_tokens, "tokens_equal": self.tokens_equal,
            "min_cosine": self.min_cosine, "max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff,
            "thresholds": {"min_cosine": self.thresholds[0], "max_rel_diff": self.thresholds[1]},
            "dtype": self.dtype, "backend": self.backend, "teacher_forced": self.teacher_forced,
            "reference": self.reference, "mask_check": self.mask_check, "logits_compared": self.logits_compared,
            "steps": [s.__dict__ | {"ok": s.ok} for s in self.steps],
            "turns": [t.__dict__ for t in self.turns], "vision": self.vision,
        }


@dataclass
class TurnReport:
    """One turn of a verified conversation: the whole conversation so far as the prompt (``prompt_tokens``),
    of which ``new_tokens`` were prefilled on the cached history (the rest reused from the KV cache)."""

    turn: int
    prompt_tokens: int
    new_tokens: int
    hf_tokens: list[int]
    onnx_tokens: list[int]


def _source_folder(manifest: Manifest, model_path: str | None) -> Path:
    if model_path:
        return Path(model_path)
    src = manifest.model.source
    path = Path(src.path)
    if src.preset and not (path / "config.json").is_file():
        path = materialize_preset(src.preset)  # deterministic: the same weights again
    if not ((path / "config.json").is_file() or is_gguf_file(path)):
        raise ModelError(f"source model '{path}' of this output is gone; pass --model FOLDER")
    return path


def _eos_ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


def reference_model(model_dir: Path, stream: bool = False):
    """transformers' fp32 model of the source (``stream``: its layer weights streamed, see ``reference``)."""
    from . import reference

    return reference.load_streamed(model_dir) if stream else reference.load_full(model_dir)


def hf_greedy(model_dir, prompt: list[int], new_tokens: int, eos: set[int], stream: bool = False):
    """transformers' own greedy generate on the source model in fp32: tokens and the raw per-step logits.

    ``model_dir``: the source folder, or a model ``reference_model`` already loaded. ``stream``: stream the decoder layers' weights (see ``reference``)."""
    import torch
    from transformers import GenerationConfig

    model = reference_model(model_dir, stream) if isinstance(model_dir, (str, Path)) else model_dir
    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=sorted(eos) or None,
                           pad_token_id=min(eos) if eos else 0, output_logits=True, return_dict_in_generate=True)
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = [l[0].float().numpy() for l in out.logits]
    return tokens, logits


def bmodel_mode(bmodel: Path, activation_dtype: str) -> str:
    """The quantization a bmodel was compiled with: from tpugraph's file name (``..._{mode}_seq...``), else
    from the float type its blocks exchange."""
    import re

    from ..compiler.options import QUANTIZE_MODES

    match = re.search(r"_(" + "|".join(QUANTIZE_MODES) + r")_seq\d+", bmodel.name)
    if match:
        return match.group(1)
    return {"bf16": "bf16", "f16": "f16"}.get(activation_dtype, "f16")


def other_mask_value(net_dtype: str) -> tuple[str, float]:
    """The mask encoding a bmodel must take besides -10000 (as its float type holds it): for BF16 nets the F16
    pattern 0xF0E2 that LLM-TPU's Llama3 demo writes whatever the net (read as BF16: about -5.5e29); for F16
    and F32 nets the lowest finite F16 value, 0xFBFF."""
    from ..contract.segments import MASK_PATTERNS, mask_value_as_read

    pattern = MASK_PATTERNS["f16"] if net_dtype == "bf16" else 0xFBFF
    return f"0x{pattern:04X}", mask_value_as_read(pattern, net_dtype)


def verify(out_dir: str | Path, prompt_length: int = 8, new_tokens: int = 8, seed: int = 0,
           model_path: str | None = None, prompt: list[int] | None = None,
           stream_reference: bool | None = None, bmodel: str | Path | None = None,
           tpu_mlir: str | Path | None = None, mask_check: bool = True, turns: int = 1,
           image: str | Path | None = None, lora: str | Path | None = None) -> VerifyReport:
    """``stream_reference``: stream the reference's layer weights (None: when the fp32 model would take
    over half the memory available). The segments are likewise kept loaded only while they fit.
    ``bmodel``: the system under test is that combined bmodel on tpu-mlir's cmodel (venv ``tpu_mlir``),
    checked first against OUT's manifest, instead of OUT's ONNX segments; with ``mask_check`` the bmodel is
    driven a second time with the other mask encoding (``other_mask_value``) and must give the same tokens.
    ``turns``: a conversation of that many turns, each compared with transformers' greedy generate on the whole
    conversation so far; the runtime keeps the KV cache between turns and prefills only each turn's new tokens
    (block_kv_i, see ``conversation``). ``image``: a vision-language output is verified with this image file
    (default: the built-in synthetic picture) in front of the prompt (proof/vision_verify.py). ``lora``: a PEFT
    LoRA adapter folder; the reference is transformers with it loaded by PEFT, and an export with LoRA inputs
    (--lora-max-rank) is fed its A and B (without it: zeros, the base model). An export with an adapter merged
    is compared with transformers + PEFT and that adapter (``lora`` may name it again, not another one)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if not manifest.complete:
        raise VerificationError(f"'{out_dir}' is an unfinished export (manifest marked incomplete); rerun the export")
    problems = validate(out_dir)
    if problems:
        more = f" (and {len(problems) - 1} more; see `tpugraph manifest validate`)" if len(problems) > 1 else ""
        raise VerificationError(f"'{out_dir}' does not match its manifest: {problems[0]}{more}")
    seq = int(manifest.options.seq_length)
    vocab = int(manifest.model.vocab_size)
    if turns < 1:
        raise UsageError(f"must be >= 1 (got {turns})", option="turns")
    if image is not None or manifest.model.vision:
        return _verify_image(out_dir, manifest, image, prompt, prompt_length, new_tokens, seed, model_path, bmodel,
                             tpu_mlir, turns)
    if prompt is None:
        for option, value in (("prompt_length", prompt_length), ("new_tokens", new_tokens)):
            if value < 1:
                raise UsageError(f"must be >= 1 (got {value})", option=option)
        rng = np.random.default_rng(seed)
        prompt = rng.integers(3, vocab, size=prompt_length).tolist()
    if len(prompt) + new_tokens - 1 > seq:
        raise UsageError(f"prompt length {len(prompt)} + {new_tokens} new tokens does not fit SEQ={seq}; use a "
                         "smaller --prompt-length or --new-tokens")
    from ..runtime.conversation import check_conversation

    check_conversation(manifest, len(prompt), turns)
    eos = _eos_ids(manifest.model.eos_token_id)
    from .reference import reference_adapter

    adapter = reference_adapter(manifest, lora)
    backend, dtype = _system_under_test(manifest, bmodel, tpu_mlir)
    try:
        return _compare(out_dir, manifest, prompt, new_tokens, eos, model_path, stream_reference, dtype, backend,
                        mask_check=mask_check, turns=turns, seed=seed, adapter=adapter)
    finally:
        if backend is not None:
            backend.close()


def _system_under_test(manifest: Manifest, bmodel, tpu_mlir) -> tuple[object, str]:
    """(backend, the thresholds' dtype): OUT's ONNX segments (None), or the bmodel on the cmodel, loaded and
    checked against the manifest before the (slow) reference runs."""
    if bmodel is None:
        return None, str(manifest.options.dtype)
    from ..runtime.backends.bmodel_backend import BmodelBackend

    backend = BmodelBackend(bmodel, manifest, tpu_mlir)
    return backend, "bmodel-" + bmodel_mode(backend.bmodel, backend.activation_dtype)


def _verify_image(out_dir: Path, manifest: Manifest, image, prompt, prompt_length: int, new_tokens: int, seed: int,
                  model_path: str | None, bmodel, tpu_mlir, turns: int) -> VerifyReport:
    """A vision-language output: the image(s) in front of the first turn (proof/vision_verify.py), its vit output
    compared too, over ``turns`` turns (the runtime keeping its KV cache); on OUT's segments or a bmodel with its
    vit net on the cmodel (no second mask encoding: the text path checks it)."""
    from .vision_verify import run_with_image

    for option, value in (("prompt_length", prompt_length), ("new_tokens", new_tokens)):
        if value < 1:
            raise UsageError(f"must be >= 1 (got {value})", option=option)
    backend, dtype = _system_under_test(manifest, bmodel, tpu_mlir)
    try:
        run = run_with_image(out_dir, manifest, image, prompt, prompt_length, new_tokens, seed,
                             _eos_ids(manifest.model.eos_token_id), _source_folder(manifest, model_path),
                             FREE_RUNNING, THRESHOLDS[dtype][0], dtype, backend, turns=turns)
    finally:
        if backend is not None:
            backend.close()
    report = VerifyReport(prompt=run.prompt, hf_tokens=[], onnx_tokens=[], dtype=dtype, backend=run.backend,
                          teacher_forced=run.forced is not None, vision=run.vision)
    for turn, done in enumerate(run.turns, start=1):
        report.hf_tokens += done.hf_tokens
        report.onnx_tokens += done.trace.tokens
        if turns > 1:
            report.turns.append(TurnReport(turn, len(done.prompt), len(done.prompt) - done.reused, done.hf_tokens,
                                           done.trace.tokens))
        _compare_steps(report, turn, done.hf_tokens, done.hf_logits, done.trace, done.forced)
    return report


def _compare(out_dir: Path, manifest: Manifest, prompt: list[int], new_tokens: int, eos: set[int],
             model_path: str | None, stream_reference: bool | None, dtype: str, backend, mask_check: bool = True, turns: int = 1,
             seed: int = 0, adapter=None) -> VerifyReport:
    from ..runtime.conversation import Conversation, KvCache

    runtime = SegmentRuntime(out_dir, manifest, backend=backend, lora=adapter)
    # One turn keeps verify's random-id prompt; a conversation uses OUT's chat template when it has one.
    conversation = Conversation.for_verify(out_dir, manifest, prompt, seed, chat=turns > 1)
    longest = conversation.longest(turns, new_tokens)
    if longest is not None and longest > runtime.seq:
        raise UsageError(f"{turns} turns of {len(prompt)} prompt + {new_tokens} new tokens take up to {longest} "
                                f"tokens and do not fit SEQ={runtime.seq}; use fewer --turns, --prompt-length or "
                                "--new-tokens")
    source = _source_folder(manifest, model_path)
    if adapter is not None:  # transformers + PEFT: the whole model (PEFT wraps transformers' modules, not streamed ones)
        from .reference import with_adapter

        stream_reference = False
        reference = with_adapter(reference_model(source), adapter.path)
    else:
        if stream_reference is None:
            from .reference import should_stream

            stream_reference = should_stream(source)
        reference = reference_model(source, stream_reference) if turns > 1 else source  # loaded once per conversation
    cache = KvCache()
    report = VerifyReport(prompt=prompt, hf_tokens=[], onnx_tokens=[], dtype=dtype, backend=runtime.backend.name,
                          teacher_forced=dtype not in FREE_RUNNING,
                          reference="streamed" if stream_reference else "whole")
    for turn in range(1, turns + 1):
        ids = conversation.prompt_ids()
        if len(ids) + new_tokens - 1 > runtime.seq:
            raise UsageError(f"turn {turn}: the conversation ({len(ids)} tokens) + {new_tokens} new tokens "
                                    f"does not fit SEQ={runtime.seq}; use fewer --turns or --new-tokens")
        hf_tokens, hf_logits = hf_greedy(reference, ids, new_tokens, eos, stream_reference)
        forced = hf_tokens if report.teacher_forced else None
        reused = runtime.reusable_prefix(cache, ids)
        try:
            trace = runtime.generate(ids, new_tokens, eos, forced=forced, cache=cache)
        except PrefillUnsupported as exc:
            raise UsageError(f"turn {turn}: {exc}") from None
        if turn == 1:
            report.prompt = ids
            first = (ids, forced, trace.tokens)
        report.hf_tokens += hf_tokens
        report.onnx_tokens += trace.tokens
        report.turns.append(TurnReport(turn, len(ids), len(ids) - reused, hf_tokens, trace.tokens))
        _compare_steps(report, turn, hf_tokens, hf_logits, trace, forced)
        if turn < turns:
            conversation.add_reply(hf_tokens, eos)  # the reference's reply is the conversation's
            conversation.add_user_turn()
    if turns == 1:
        report.turns = []
    if mask_check and dtype.startswith("bmodel-"):  # the first turn again, with the other mask encoding
        ids, forced, tokens = first
        pattern, value = other_mask_value(backend.activation_dtype)
        other = SegmentRuntime(out_dir, manifest, backend=backend, mask_value=value, lora=adapter)
        again = other.generate(ids, new_tokens, eos, forced=forced)
        # compared with the first turn's tokens under the contract's mask (a conversation has more turns)
        report.mask_check = {"pattern": pattern, "value": value, "tokens": again.tokens, "expected": tokens}
        if again.tokens != tokens:
            log.warning("mask %s (%g) gives tokens %s, mask -10000 %s", pattern, value, again.tokens, tokens)
    return report


def _compare_steps(report: VerifyReport, turn: int, hf_tokens: list[int], hf_logits, trace, forced) -> None:
    min_cos, max_rel = report.thresholds
    for step, (ref, got) in enumerate(zip(hf_logits, trace.logits)):
        if got is None:  # a top-k lm_head: tokens only (their greedy choice must be transformers')
            hf_token = hf_tokens[step] if step < len(hf_tokens) else -1
            nan = float("nan")
            report.steps.append(StepReport(step, hf_token, trace.tokens[step], nan, nan, nan, min_cos, max_rel,
                                           logits_compared=False))
            continue
        ref = ref.astype(np.float64)
        got = got.astype(np.float64)
        cos = float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got) + 1e-30))
        diff = float(np.max(np.abs(ref - got)))
        span = float(ref.max() - ref.min()) or 1.0
        hf_token = hf_tokens[step] if step < len(hf_tokens) else -1
        onnx_token = trace.tokens[step]
        near_tie = (bool(forced) and 0 <= hf_token != onnx_token
                    and (ref[hf_token] - ref[onnx_token]) / span <= max_rel)
        report.steps.append(StepReport(step, hf_token, trace.tokens[step], cos, diff, diff / span,
                                       min_cos, max_rel, near_tie, turn))
