"""An ONNX file or an OUT folder -> a summary a person (or a script, as JSON) can check at a glance."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract.manifest import MANIFEST_NAME, graph_io, read_manifest
from ..contract.segments import TensorSpec


@dataclass
class OnnxSummary:
    path: str
    opset: int
    ir_version: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    nodes: int
    op_histogram: dict[str, int]
    parameters: int
    parameter_bytes: int
    external_data: bool
    dynamic_dims: list[str] = field(default_factory=list)
    unsupported_ops: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["inputs"] = [t.to_json() for t in self.inputs]
        d["outputs"] = [t.to_json() for t in self.outputs]
        return d


def _unsupported(op_types: set[str]) -> list[str]:
    from ..passes.make_tpu_compatible import unsupported_ops

    return sorted(unsupported_ops(op_types))


def inspect_onnx(path: str | Path) -> OnnxSummary:
    import numpy as np
    import onnx

    from ..passes.run_file import load_model_file

    model = load_model_file(Path(path), load_external_data=False)
    graph = model.graph
    inputs, outputs, dynamic = graph_io(model)
    for v in graph.value_info:
        TensorSpec.from_value_info(v, dynamic)
    ops = Counter(n.op_type for n in graph.node)
    params = 0
    nbytes = 0
    for t in graph.initializer:
        count = int(np.prod(t.dims)) if t.dims else 1
        params += count
        nbytes += count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxSummary(
        path=str(path), opset=opset, ir_version=int(model.ir_version), inputs=inputs, outputs=outputs,
        nodes=len(graph.node), op_histogram=dict(ops.most_common()), parameters=params, parameter_bytes=nbytes,
        external_data=any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer),
        dynamic_dims=dynamic, unsupported_ops=_unsupported(set(ops)),
    )


def inspect_output(out: str | Path) -> list[dict[str, Any]]:
    """One row per segment of an OUT folder's manifest."""
    manifest = read_manifest(Path(out))
    rows = []
    for seg in manifest.segments:
        rows.append({
            "name": seg.name, "kind": seg.kind, "layer": seg.layer, "file": seg.file,
            "bytes": seg.size + sum(int(e.get("size", 0)) for e in seg.external_data),
            "inputs": [t.to_json() for t in seg.inputs],  # {name, shape: list of ints, dtype}
            "outputs": [t.to_json() for t in seg.outputs],
            "passes": [p.get("name") for p in seg.passes if p.get("modified")],
            "nodes": seg.passes[-1].get("nodes_after") if seg.passes else None,
        })
    return rows


def is_output_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()
