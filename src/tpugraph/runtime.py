"""Drive exported segments in onnxruntime exactly as the TPU runtime does (CONTRACT.md, greedy decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .contract import decode_inputs, prefill_inputs
from .manifest import Manifest, SegmentEntry, read_manifest


# Weight dtypes onnxruntime's CPU provider has no kernels for: those segments run on onnx's reference
# evaluator instead (pure numpy, slow: meant for verifying tiny models, not for real ones).
REFERENCE_DTYPES = ("bfloat16",)


@dataclass(frozen=True)
class _Named:
    name: str


class _ReferenceSession:
    """The slice of onnxruntime's InferenceSession the driver uses, backed by onnx.reference."""

    def __init__(self, path: str):
        import onnx
        from onnx.reference import ReferenceEvaluator

        self._model = onnx.load(path)
        self._evaluator = ReferenceEvaluator(self._model)
        inits = {i.name for i in self._model.graph.initializer}
        self._inputs = [_Named(v.name) for v in self._model.graph.input if v.name not in inits]

    def get_inputs(self):
        return self._inputs

    def run(self, output_names, feeds):
        return self._evaluator.run(output_names, feeds)


@dataclass
class GenerationTrace:
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)  # one [V] array per generated token


class SegmentRuntime:
    """Loads the segments of an OUT folder and runs prefill + decode, feeding inputs by position."""

    def __init__(self, out_dir: Path, manifest: Manifest | None = None, keep_bytes: int | None = None):
        """``keep_bytes``: how many bytes of segment files (with their data) may stay loaded between runs;
        past that a segment is loaded for each run and dropped after (a 7B model's 64 layer segments
        hold 52 GB). Default: half the memory available."""
        import onnxruntime as ort

        from .reference import available_memory

        self.out_dir = Path(out_dir)
        self.manifest = manifest or read_manifest(self.out_dir)
        self.keep_bytes = available_memory() // 2 if keep_bytes is None else keep_bytes
        self._kept_bytes = 0
        self.seq = int(self.manifest.options["seq_length"])
        self.layers = int(self.manifest.model["num_layers"])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self._ort, self._opts = ort, opts
        self._sessions: dict[str, object] = {}
        self.backend = "onnx-reference" if self.manifest.options.get("dtype") in REFERENCE_DTYPES else "onnxruntime"
        # The seed's variant: lm_head takes the top-1 itself, outputs (token, m_logits), no greedy_head.
        self.greedy_in_lm_head = len(self.manifest.segment("lm_head").outputs) == 2

    def _session(self, name: str):
        if name in self._sessions:
            return self._sessions[name]
        entry = self.manifest.segment(name)
        path = str(self.out_dir / entry.file)
        if self.backend == "onnx-reference":
            session = _ReferenceSession(path)
        else:
            session = self._ort.InferenceSession(path, self._opts, providers=["CPUExecutionProvider"])
        size = self._segment_bytes(entry)
        if self._kept_bytes + size <= self.keep_bytes:
            self._sessions[name] = session
            self._kept_bytes += size
        return session

    def _segment_bytes(self, entry: SegmentEntry) -> int:
        """The segment's file, plus its share of data files: a shared data file counts whole for each."""
        files = [entry.file] + [e["file"] for e in entry.external_data]
        return sum((self.out_dir / f).stat().st_size for f in files if (self.out_dir / f).is_file())

    def run(self, name: str, *arrays: np.ndarray) -> list[np.ndarray]:
        """Run segment ``name`` with ``arrays`` in the contract's input order, cast to the declared dtypes."""
        entry: SegmentEntry = self.manifest.segment(name)
        sess = self._session(name)
        feeds = {}
        for declared, spec, arr in zip(sess.get_inputs(), entry.inputs, arrays, strict=True):
            feeds[declared.name] = np.asarray(arr).astype(spec.dtype, copy=False)
        return sess.run(None, feeds)

    def next_token(self, hidden_last: np.ndarray) -> tuple[int, np.ndarray]:
        if self.greedy_in_lm_head:
            token, logits = self.run("lm_head", hidden_last.reshape(1, -1))
        else:
            (logits,) = self.run("lm_head", hidden_last.reshape(1, -1))
            (token,) = self.run("greedy_head", logits)
        return int(np.asarray(token).reshape(-1)[0]), np.asarray(logits, dtype=np.float32).reshape(-1)

    def prefill(self, prompt: list[int]):
        ids, pos, mask = prefill_inputs(prompt, self.seq)
        (hidden,) = self.run("embedding", ids)
        history = []
        for i in range(self.layers):
            hidden, k, v = self.run(f"block_{i}", hidden, pos, mask)
            history.append((k.copy(), v.copy()))
        return hidden[0, len(prompt) - 1], history

    def decode(self, token: int, n: int, history) -> np.ndarray:
        ids, pos, mask = decode_inputs(token, n, self.seq)
        (hidden,) = self.run("embedding_cache", ids)
        for i in range(self.layers):
            hk, hv = history[i]
            hidden, k, v = self.run(f"block_cache_{i}", hidden, pos, mask, hk, hv)
            hk[0, n] = k[0, 0]
            hv[0, n] = v[0, 0]
        return hidden[0, 0]

    def generate(self, prompt: list[int], max_new_tokens: int, eos_ids: set[int] | None = None,
                 forced: list[int] | None = None) -> GenerationTrace:
        """Greedy generation; with ``forced``, step i feeds forced[i] back instead of its own top-1
        (teacher forcing: the logits of every step are then comparable with another run's)."""
        if not 1 <= len(prompt) <= self.seq:
            raise ValueError(f"prompt length {len(prompt)} must be within 1..{self.seq}")
        trace = GenerationTrace()
        hidden, history = self.prefill(prompt)
        n = len(prompt)
        while True:
            token, logits = self.next_token(hidden)
            trace.tokens.append(token)
            trace.logits.append(logits)
            fed = token if forced is None else forced[len(trace.tokens) - 1]
            if (len(trace.tokens) >= max_new_tokens or (eos_ids and fed in eos_ids) or n >= self.seq
                    or (forced is not None and len(trace.tokens) >= len(forced))):
                return trace
            hidden = self.decode(fed, n, history)
            n += 1
