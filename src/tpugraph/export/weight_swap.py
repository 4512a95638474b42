"""One optimised layer graph + another layer's parameters -> that layer's graph, without tracing it again.

The template is traced from *probe* parameters (distinct random values), so every initializer that is a
parameter (as is, transposed, or reshaped) is recognised by its bytes without ambiguity. Anything else
(rotary tables, shape constants) must be the same for every layer; the caller proves that by comparing
a real-weight export of one layer with the template filled with that layer's weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..passes._graph import tensor_bytes
from .external_data import LazyWeight, tensor_array, weight_data

log = logging.getLogger(__name__)

IDENTITY = "identity"  # same bytes (possibly another shape)
TRANSPOSE = "transpose"  # 2-D parameter, transposed


@dataclass(frozen=True)
class InitializerSource:
    initializer: str
    param: str
    transform: str
    dims: tuple[int, ...]
    data_type: int = onnx.TensorProto.FLOAT


@dataclass
class WeightTemplate:
    """The optimised graph of one layer, its parameter tensors left empty.

    ``weights`` are big tensors set aside from the graph while it was optimised (see
    ``factory.hide_weights``); parameters among them are empty stubs here, anything else keeps its bytes.
    """

    model: onnx.ModelProto
    sources: list[InitializerSource]
    weights: list[onnx.TensorProto] = field(default_factory=list)

    def fill(self, params: Mapping[str, np.ndarray]) -> "FilledArrays":
        """The initializer arrays of the layer whose parameters are ``params`` (float arrays by param name),
        made one at a time when asked for, so a layer's weights are never all copied at once. If
        ``params`` has a ``source(name)`` method (a torch tensor in the checkpoint's dtype), each array is
        made from that in one copy: cast and transpose together."""
        return FilledArrays({s.initializer: s for s in self.sources}, params)


TORCH_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
                onnx.TensorProto.DOUBLE: torch.float64}


class FilledArrays(Mapping):
    """initializer name -> its array for one layer, computed from that layer's parameters on access."""

    def __init__(self, sources: dict[str, InitializerSource], params: Mapping[str, np.ndarray]):
        self._sources = sources
        self._params = params

    def __getitem__(self, name: str) -> np.ndarray:
        src = self._sources[name]
        source = getattr(self._params, "source", None)
        p = source(src.param) if source is not None else torch.from_numpy(np.ascontiguousarray(self._params[src.param]))
        return tensor_array(p, TORCH_DTYPES.get(src.data_type), src.transform == TRANSPOSE).reshape(src.dims)

    def source(self, name: str) -> tuple | None:
        """What the array of ``name`` is made from, if ``params`` names its tensors (``source_key``)."""
        source_key = getattr(self._params, "source_key", None)
        if source_key is None:
            return None
        src = self._sources[name]
        return (source_key(src.param), src.transform, src.dims, src.data_type)

    def __contains__(self, name: object) -> bool:  # without computing the array
        return name in self._sources

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


SAMPLE_ELEMS = 64


def _digest(arr: np.ndarray, transposed: bool = False) -> tuple:
    """A key of the values of ``arr`` in C order (of ``arr.T`` if ``transposed``) from a sample of them at
    its start, middle and end: enough to tell random probe tensors apart without reading gigabytes.
    Nothing rests on it being exact: a template is checked byte for byte (``reproduces``) before use."""
    n = arr.size
    k = np.arange(min(n, SAMPLE_ELEMS))
    idx = np.unique(np.concatenate([k, n // 2 + k // 2, n - 1 - k])) if n > 3 * SAMPLE_ELEMS else np.arange(n)
    if transposed:
        rows = arr.shape[0]
        values = arr[idx % rows, idx // rows]
    else:
        values = np.ascontiguousarray(arr).reshape(-1)[idx]
    return str(arr.dtype), n, values.tobytes()


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def discover_sources(model: onnx.ModelProto, probe: dict[str, np.ndarray],
                     weights: Iterable[onnx.TensorProto] = ()) -> list[InitializerSource]:
    """Which probe parameter (and transform) each initializer of ``model`` (or set-aside weight) holds.

    Raises ValueError when one probe parameter is not found at all: the graph then holds it in a form
    the swap cannot reproduce (e.g. folded arithmetic), and the caller must export per layer.
    """
    index: dict[tuple, tuple[str, str]] = {}
    for name, p in probe.items():
        index.setdefault(_digest(p), (name, IDENTITY))
        if p.ndim == 2:
            index.setdefault(_digest(p, transposed=True), (name, TRANSPOSE))
    sources, used = [], set()
    for init in [*model.graph.initializer, *weights]:
        if init.data_type not in FLOAT_TYPES:
            continue
        hit = index.get(_digest(_array(init)))
        if hit:
            sources.append(InitializerSource(init.name, hit[0], hit[1], tuple(init.dims), init.data_type))
            used.add(hit[0])
    missing = sorted(set(probe) - used)
    if missing:
        raise ValueError(f"parameters not found as initializers (transformed by the graph): {', '.join(missing)}")
    return sources


def _array(tensor) -> np.ndarray:
    """The values of a TensorProto or LazyWeight (bfloat16 stays its bits: only compared, never computed)."""
    if isinstance(tensor, LazyWeight):
        return tensor.array()
    return numpy_helper.to_array(tensor)


def _strip(tensor: onnx.TensorProto) -> None:
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
        tensor.ClearField(name)


def make_template(model: onnx.ModelProto, sources: list[InitializerSource],
                  weights: Iterable[onnx.TensorProto] = ()) -> WeightTemplate:
    """The graph with the parameter tensors' bytes dropped (they are filled per layer)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    holds_param = {s.initializer for s in sources}
    for init in m.graph.initializer:
        if init.name in holds_param:
            _strip(init)
    kept = []
    for w in weights:
        stub = onnx.TensorProto()
        if w.name in holds_param:
            stub.name, stub.data_type = w.name, w.data_type
            stub.dims.extend(w.dims)
        else:
            stub.CopyFrom(w.to_proto() if isinstance(w, LazyWeight) else w)
        kept.append(stub)
    return WeightTemplate(m, sources, kept)


def _fill(tensor: onnx.TensorProto, arr: np.ndarray) -> None:
    arr = arr.astype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type), copy=False)
    tensor.raw_data = np.ascontiguousarray(arr).tobytes()


def apply(template: WeightTemplate, arrays: Mapping[str, np.ndarray]) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of the template graph holding ``arrays`` in place of the parameters, and its set-aside weights
    (parameters among them as LazyWeight: their bytes are made when written)."""
    m = onnx.ModelProto()
    m.CopyFrom(template.model)
    for init in m.graph.initializer:
        if init.name in arrays:
            _fill(init, arrays[init.name])
    weights = []
    for stub in template.weights:
        if stub.name in arrays:  # bytes made when the weight is written
            source = arrays.source(stub.name) if isinstance(arrays, FilledArrays) else None
            weights.append(LazyWeight(stub.name, stub.data_type, stub.dims,
                                      lambda name=stub.name: arrays[name], source))
            continue
        w = onnx.TensorProto()
        w.CopyFrom(stub)
        weights.append(w)
    return m, weights


def _same_bytes(data: memoryview, tensor) -> bool:
    theirs = weight_data(tensor)
    if len(data) != len(theirs):
        return False
    return np.array_equal(np.frombuffer(data, np.uint8), np.frombuffer(theirs, np.uint8))


def reproduces(template: WeightTemplate, arrays: Mapping[str, np.ndarray], model: onnx.ModelProto,
               weights: Iterable[onnx.TensorProto] = ()) -> bool:
    """Whether the template filled with ``arrays`` equals ``model`` (+ its set-aside ``weights``) exactly,
    checked tensor by tensor without building the filled model."""
    weights = list(weights)
    t, m = template.model, model
    if (list(t.opset_import) != list(m.opset_import) or t.ir_version != m.ir_version
            or list(t.graph.node) != list(m.graph.node) or list(t.graph.input) != list(m.graph.input)
            or list(t.graph.output) != list(m.graph.output)):
        return False
    pairs = list(zip(t.graph.initializer, m.graph.initializer)) + list(zip(template.weights, weights))
    if len(t.graph.initializer) != len(m.graph.initializer) or len(template.weights) != len(weights):
        return False
    for mine, theirs in pairs:
        if (mine.name, list(mine.dims), mine.data_type) != (theirs.name, list(theirs.dims), theirs.data_type):
            return False
        if mine.name in arrays:
            arr = arrays[mine.name].astype(onnx.helper.tensor_dtype_to_np_dtype(mine.data_type), copy=False)
            if not _same_bytes(memoryview(np.ascontiguousarray(arr)).cast("B"), theirs):
                return False
        elif not _same_bytes(memoryview(tensor_bytes(mine)), theirs):
            return False
    return True

