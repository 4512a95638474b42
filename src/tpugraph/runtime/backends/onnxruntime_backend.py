"""OUT's ONNX segments in onnxruntime (or onnx's reference evaluator for the weight dtypes it lacks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...contract.manifest import Manifest, SegmentEntry

# Weight dtypes onnxruntime's CPU provider has no kernels for: those segments run on onnx's reference
# evaluator instead (pure numpy, slow: meant for verifying tiny models, not for real ones).
REFERENCE_DTYPES = ("bfloat16",)


@dataclass(frozen=True)
class _Named:
    name: str


class _ReferenceSession:
    """The slice of onnxruntime's InferenceSession the backend uses, backed by onnx.reference."""

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


class OnnxBackend:
    """Loads segments on first use and keeps them loaded while they fit in ``keep_bytes``."""

    def __init__(self, out_dir: Path, manifest: Manifest, keep_bytes: int | None = None):
        """``keep_bytes``: how many bytes of segment files (with their data) may stay loaded between runs;
        past that a segment is loaded for each run and dropped after (a 7B model's 64 layer segments
        hold 52 GB). Default: half the memory available."""
        import onnxruntime as ort

        from ...proof.reference import available_memory

        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.keep_bytes = available_memory() // 2 if keep_bytes is None else keep_bytes
        self._kept_bytes = 0
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self._ort, self._opts = ort, opts
        self._sessions: dict[str, object] = {}
        self._extra: dict[str, Path] = {}  # nets beside OUT's segments (add_net), by name
        self.name = "onnx-reference" if manifest.options.dtype in REFERENCE_DTYPES else "onnxruntime"

    def add_net(self, name: str, path: Path) -> None:
        """A net that is not one of OUT's segments (the evaluation's lm_head_all), run by name like them; its
        inputs are float32."""
        self._extra[name] = Path(path)

    def _session(self, name: str):
        if name in self._sessions:
            return self._sessions[name]
        if name in self._extra:
            path = str(self._extra[name])
            session = _ReferenceSession(path) if self.name == "onnx-reference" else \
                self._ort.InferenceSession(path, self._opts, providers=["CPUExecutionProvider"])
            self._sessions[name] = session
            return session
        entry = self.manifest.segment(name)
        path = str(self.out_dir / entry.file)
        try:
            if self.name == "onnx-reference":
                session = _ReferenceSession(path)
            else:
                session = self._ort.InferenceSession(path, self._opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # the file changed since the export (run does not hash every file as verify does)
            from ...contract.manifest import validate
            from ...errors import VerificationError

            problems = [p for p in validate(self.out_dir) if p.startswith(f"{name}:")]
            if not problems:
                raise
            raise VerificationError(f"'{self.out_dir}' does not match its manifest: {problems[0]}") from exc
        size = self._segment_bytes(entry)
        if self._kept_bytes + size <= self.keep_bytes:
            self._sessions[name] = session
            self._kept_bytes += size
        return session

    def _segment_bytes(self, entry: SegmentEntry) -> int:
        """The segment's file, plus its share of data files: a shared data file counts whole for each."""
        files = [entry.file] + [e.file for e in entry.external_data]
        return sum((self.out_dir / f).stat().st_size for f in files if (self.out_dir / f).is_file())

    def run(self, net: str, *arrays: np.ndarray) -> list[np.ndarray]:
        if net in self._extra:
            sess = self._session(net)
            return sess.run(None, {d.name: np.asarray(a, dtype=np.float32) for d, a in zip(sess.get_inputs(), arrays,
                                                                                          strict=True)})
        entry: SegmentEntry = self.manifest.segment(net)
        sess = self._session(net)
        feeds = {}
        for declared, spec, arr in zip(sess.get_inputs(), entry.inputs, arrays, strict=True):
            feeds[declared.name] = np.asarray(arr).astype(spec.dtype, copy=False)
        return sess.run(None, feeds)

    def close(self) -> None:
        self._sessions.clear()
        self._kept_bytes = 0
