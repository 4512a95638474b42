"""Sampled decoding on a sample head: the head's inputs from the tokens so far, and the host's draw from its probs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError

# The heads a manifest may have, in the order they are preferred.
SAMPLE_HEAD_NETS = ("sample_head", "penalty_sample_head")


@dataclass
class SamplingParams:
    """transformers' GenerationConfig defaults: temperature 1, top-p 1, top-k 50, repetition penalty 1."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    penalty: float = 1.0
    seed: int = 0
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def check(self, max_top_k: int) -> "SamplingParams":
        for option, value in (("temperature", self.temperature), ("penalty", self.penalty)):
            if not value > 0:
                raise UsageError(f"must be > 0 (got {value})", option=option)
        if not 0 < self.top_p <= 1:
            raise UsageError(f"must be within (0, 1] (got {self.top_p})", option="top_p")
        if not 1 <= self.top_k <= max_top_k:
            raise UsageError(f"must be within 1..{max_top_k}, the head's K (got {self.top_k})", option="top_k")
        return self


def sample_head_of(names: set[str], out_dir) -> str:
    """The sample head net of an output, or a UsageError saying how to get one."""
    for net in SAMPLE_HEAD_NETS:
        if net in names:
            return net
    raise UsageError(f"'{out_dir}' has no sample head: re-export with --sample-head (or --sample-head legacy) "
                     "to sample, or drop --sample for greedy decoding")


def penalty_window(context: list[int], seq: int) -> np.ndarray:
    """The recent tokens the repetition penalty sees, as [1, SEQ]: the last SEQ of ``context``, padded with
    its first token (already in the set: the padding penalises nothing new)."""
    recent = context[-seq:]
    ids = np.full((1, seq), recent[0], dtype=np.int64)
    ids[0, : len(recent)] = recent
    return ids


def head_inputs(net: str, logits: np.ndarray, context: list[int], seq: int, p: SamplingParams) -> list[np.ndarray]:
    """The inputs of ``net`` in its contract order (CONTRACT.md: the two tables order them differently)."""
    ids = penalty_window(context, seq)
    f = lambda v: np.array([v], dtype=np.float32)  # noqa: E731
    if net == "sample_head":
        return [logits.reshape(1, -1), ids, f(p.penalty), f(p.temperature), np.array([p.top_k], np.int64), f(p.top_p)]
    return [logits.reshape(1, -1), ids, f(p.top_p), f(p.temperature), f(p.penalty)]


def draw(probs: np.ndarray, tokens: np.ndarray, rng: np.random.Generator) -> int:
    """One token: index i drawn with probability probs[i] (float64, renormalised), then tokens[i]."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    p = np.where(p > 0, p, 0.0)
    total = p.sum()
    if not np.isfinite(total) or total <= 0:
        raise UsageError("the sample head returned no probability mass (non-finite logits?)")
    return int(np.asarray(tokens).reshape(-1)[rng.choice(p.size, p=p / total)])
