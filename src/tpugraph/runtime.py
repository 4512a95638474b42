"""Drive segments exactly as the TPU runtime does (CONTRACT.md, greedy decoding), on any SegmentBackend."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import SegmentBackend
from .contract import decode_inputs, prefill_inputs
from .manifest import Manifest, read_manifest


@dataclass
class GenerationTrace:
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)  # one [V] array per generated token
    prefill_seconds: float = 0.0  # prompt in, first token out
    decode_seconds: float = 0.0  # every later token

    @property
    def decode_tokens_per_second(self) -> float | None:
        later = len(self.tokens) - 1
        return later / self.decode_seconds if later > 0 and self.decode_seconds > 0 else None


TokenFn = Callable[[int], None]


class SegmentRuntime:
    """Runs prefill + decode over OUT's nets, feeding inputs by position, on a backend (default: onnxruntime)."""

    def __init__(self, out_dir: Path, manifest: Manifest | None = None, keep_bytes: int | None = None,
                 backend: SegmentBackend | None = None):
        """``keep_bytes``: for the default onnxruntime backend, see OnnxBackend."""
        self.out_dir = Path(out_dir)
        self.manifest = manifest or read_manifest(self.out_dir)
        if backend is None:
            from .backends.onnxruntime_backend import OnnxBackend

            backend = OnnxBackend(self.out_dir, self.manifest, keep_bytes)
        self.backend = backend
        self.seq = int(self.manifest.options["seq_length"])
        self.layers = int(self.manifest.model["num_layers"])
        # The seed's variant: lm_head takes the top-1 itself, outputs (token, m_logits), no greedy_head.
        self.greedy_in_lm_head = len(self.manifest.segment("lm_head").outputs) == 2
        # Gemma 4 (README "Gemma 4"): the layer whose KV each layer reuses, and per-layer embeddings.
        self.kv_from = [r.get("kv_from") for r in self.manifest.model.get("layers_kv") or []] or [None] * self.layers
        self.per_layer = bool(self.manifest.model.get("per_layer_embedding"))

    def _extra(self, embedded: list[np.ndarray], layer: int) -> list[np.ndarray]:
        """A block's per-layer embedding inputs: its slice of per_layer_embeds, and the token embedding."""
        if not self.per_layer:
            return []
        return [np.ascontiguousarray(embedded[1][:, :, layer]), embedded[0]]

    def run(self, name: str, *arrays: np.ndarray) -> list[np.ndarray]:
        """Run segment ``name`` with ``arrays`` in the contract's input order."""
        return self.backend.run(name, *arrays)

    def next_token(self, hidden_last: np.ndarray) -> tuple[int, np.ndarray]:
        if self.greedy_in_lm_head:
            token, logits = self.run("lm_head", hidden_last.reshape(1, -1))
        else:
            (logits,) = self.run("lm_head", hidden_last.reshape(1, -1))
            (token,) = self.run("greedy_head", logits)
        return int(np.asarray(token).reshape(-1)[0]), np.asarray(logits, dtype=np.float32).reshape(-1)

    def prefill(self, prompt: list[int]):
        ids, pos, mask = prefill_inputs(prompt, self.seq)
        embedded = self.run("embedding", ids)
        hidden = embedded[0]
        history = []
        for i in range(self.layers):
            src = self.kv_from[i]
            if src is not None:  # shared KV: the owner layer's keys/values in, none out, no history of its own
                (hidden,) = self.run(f"block_{i}", hidden, pos, mask, *self._extra(embedded, i), *history[src])
                history.append(None)
                continue
            hidden, k, v = self.run(f"block_{i}", hidden, pos, mask, *self._extra(embedded, i))
            history.append((np.array(k, copy=True), np.array(v, copy=True)))
        return hidden[0, len(prompt) - 1], history

    def decode(self, token: int, n: int, history) -> np.ndarray:
        ids, pos, mask = decode_inputs(token, n, self.seq)
        embedded = self.run("embedding_cache", ids)
        hidden = embedded[0]
        new: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for i in range(self.layers):
            src = self.kv_from[i]
            if src is not None:  # shared KV: the owner's history with its new row appended, [1, SEQ+1, KVH, D]
                hk, hv = history[src]
                k, v = new[src]
                shared = (np.concatenate([hk, k], axis=1), np.concatenate([hv, v], axis=1))
                (hidden,) = self.run(f"block_cache_{i}", hidden, pos, mask, *self._extra(embedded, i), *shared)
                continue
            hk, hv = history[i]
            hidden, k, v = self.run(f"block_cache_{i}", hidden, pos, mask, *self._extra(embedded, i), hk, hv)
            new[i] = (np.array(k, copy=True), np.array(v, copy=True))
            hk[0, n] = k[0, 0]
            hv[0, n] = v[0, 0]
        return hidden[0, 0]

    def generate(self, prompt: list[int], max_new_tokens: int, eos_ids: set[int] | None = None,
                 forced: list[int] | None = None, on_token: TokenFn | None = None) -> GenerationTrace:
        """Greedy generation; with ``forced``, step i feeds forced[i] back instead of its own top-1
        (teacher forcing: the logits of every step are then comparable with another run's). ``on_token`` is
        called with each token as soon as it is known (streaming)."""
        if not 1 <= len(prompt) <= self.seq:
            raise ValueError(f"prompt length {len(prompt)} must be within 1..{self.seq}")
        trace = GenerationTrace()
        t0 = time.perf_counter()
        hidden, history = self.prefill(prompt)
        n = len(prompt)
        while True:
            token, logits = self.next_token(hidden)
            now = time.perf_counter()
            if trace.tokens:
                trace.decode_seconds += now - t0
            else:
                trace.prefill_seconds = now - t0
            trace.tokens.append(token)
            trace.logits.append(logits)
            if on_token:
                on_token(token)
            fed = token if forced is None else forced[len(trace.tokens) - 1]
            if (len(trace.tokens) >= max_new_tokens or (eos_ids and fed in eos_ids) or n >= self.seq
                    or (forced is not None and len(trace.tokens) >= len(forced))):
                return trace
            t0 = time.perf_counter()
            hidden = self.decode(fed, n, history)
            n += 1

    def close(self) -> None:
        self.backend.close()
