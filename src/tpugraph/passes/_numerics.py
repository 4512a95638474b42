"""Run models in onnxruntime on random inputs of their declared shapes and compare outputs."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from tpugraph.errors import PassFailed

from . import _graph

PermMap = dict[str, dict[str, list[int]]]


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """randn for float inputs, 0/1 for integer and bool inputs (valid ids, positions, indices)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        shape = _graph.static_shape(v)
        if shape is None:
            raise PassFailed(f"input '{v.name}' has no static shape, cannot generate test data")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[v.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[v.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], work_dir: Path | None = None) -> list[np.ndarray]:
    """Outputs in graph order. Models above the protobuf limit go through a file with external data."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not _graph.is_large(model):
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = Path(tmp) / "model.onnx"
        _graph.save_external(model, path)
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)


def compare(ref_model: onnx.ModelProto, ref_outputs: list[np.ndarray], feeds: dict[str, np.ndarray],
            new_model: onnx.ModelProto, io_perms: PermMap | None = None,
            work_dir: Path | None = None) -> dict[str, float]:
    """Max abs difference per output of ``new_model`` against the reference, matched by position.

    Inputs and outputs are matched by position because renaming passes change names; ``io_perms``
    (``{"inputs": {new_name: perm}, "outputs": {...}}``, new = transpose(old, perm)) covers passes
    that change the KV layout at the boundary.
    """
    perms_in = (io_perms or {}).get("inputs", {})
    perms_out = (io_perms or {}).get("outputs", {})
    ref_inputs = _graph.graph_input_names(ref_model.graph)
    new_inputs = _graph.graph_input_names(new_model.graph)
    if len(ref_inputs) != len(new_inputs):
        raise PassFailed(f"input count changed from {len(ref_inputs)} to {len(new_inputs)}")
    new_feeds = {}
    for old, new in zip(ref_inputs, new_inputs):
        value = feeds[old]
        new_feeds[new] = np.transpose(value, perms_in[new]) if new in perms_in else value
    new_outputs = run(new_model, new_feeds, work_dir)
    if len(new_outputs) != len(ref_outputs):
        raise PassFailed(f"output count changed from {len(ref_outputs)} to {len(new_outputs)}")
    diffs: dict[str, float] = {}
    for out, ref, got in zip(new_model.graph.output, ref_outputs, new_outputs):
        expected = np.transpose(ref, perms_out[out.name]) if out.name in perms_out else ref
        if expected.shape != got.shape:
            raise PassFailed(f"output '{out.name}' shape changed from {expected.shape} to {got.shape}")
        if expected.size == 0:
            diffs[out.name] = 0.0
        elif np.issubdtype(expected.dtype, np.number) or expected.dtype == np.bool_:
            diffs[out.name] = float(np.max(np.abs(expected.astype(np.float64) - got.astype(np.float64))))
        else:
            diffs[out.name] = 0.0 if np.array_equal(expected, got) else float("inf")
    return diffs


@dataclass
class Reference:
    """A model's outputs on fixed random inputs, to compare a transformed model against."""

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    outputs: list[np.ndarray]

    @classmethod
    def compute(cls, model: onnx.ModelProto, work_dir: Path | None = None, seed: int = 0) -> "Reference":
        feeds = random_feeds(model, seed)
        return cls(_io_only(model), feeds, run(model, feeds, work_dir))

    def diffs(self, new_model: onnx.ModelProto, io_perms: PermMap | None = None,
              work_dir: Path | None = None) -> dict[str, float]:
        return compare(self.model, self.outputs, self.feeds, new_model, io_perms, work_dir)

    def compare(self, new_model: onnx.ModelProto, tolerance: float, io_perms: PermMap | None = None,
                work_dir: Path | None = None) -> dict[str, float]:
        diffs = self.diffs(new_model, io_perms, work_dir)
        bad = {k: v for k, v in diffs.items() if not v <= tolerance}
        if bad:
            worst = max(bad, key=lambda k: bad[k])
            raise PassFailed(f"numeric check failed: output '{worst}' max abs diff {bad[worst]:.3g} "
                             f"> tolerance {tolerance:g}")
        return diffs


def _io_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep only the graph I/O declarations (the reference model may be changed in place later)."""
    out = onnx.ModelProto()
    out.graph.input.extend(model.graph.input)
    out.graph.output.extend(model.graph.output)
    input_names = {v.name for v in model.graph.input}
    for t in model.graph.initializer:
        if t.name in input_names:  # IR < 4 lists initializers as inputs: keep the name, not the data
            out.graph.initializer.add(name=t.name)
    return out
