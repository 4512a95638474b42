"""Subgraphs computed only from constants -> initializers (onnx-graphsurgeon), weights never duplicated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from . import _graph
from .base import GraphPass, PassContext

_SHARED_WEIGHT_BYTES = 1 << 16


class FoldConstants(GraphPass):
    name = "fold_constants"
    summary = "Fold constant subgraphs (onnx-graphsurgeon, size-capped, weights never duplicated), clean up, toposort"
    @dataclass(frozen=True)
    class Options:
        size_threshold: int = 1 << 24
        fold_shapes: bool = True
    in_place = False  # builds a new model (graphsurgeon's export), from a copy of the one it is given

    def validate(self) -> None:
        from tpugraph.errors import UsageError

        if int(self.opts.size_threshold) < 0:
            raise UsageError("fold_constants: size_threshold must be >= 0 bytes")

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
        import onnx_graphsurgeon as gs
        from onnx_graphsurgeon.logger import G_LOGGER

        threshold = int(self.opts.size_threshold)
        excluded: set[int] = set()

        def exclude(node: "gs.Node") -> bool:
            # Folding a node that reads a big constant would materialise a second big tensor next to
            # it (a transposed or cast weight): keep the computation instead. A weight shared with
            # other consumers would survive the fold and be duplicated, so it is excluded earlier.
            for inp in node.inputs:
                if isinstance(inp, gs.Constant):
                    nbytes = _const_nbytes(inp)
                    if nbytes > threshold or (nbytes > _SHARED_WEIGHT_BYTES and len(inp.outputs) > 1):
                        excluded.add(id(node))
                        return True
            return False

        model = _graph.copy_model(model)  # graphsurgeon writes into the tensors it imports (Constant names)
        with G_LOGGER.suppress(G_LOGGER.ERROR):
            graph = gs.import_onnx(model)
            graph.toposort()
            lowered = {t.name for n in graph.nodes if n.op == "Constant" for t in n.outputs}
            computed = {name for name, t in graph.tensors().items()
                        if isinstance(t, gs.Variable) and t.inputs and name not in lowered}
            graph.fold_constants(fold_shapes=bool(self.opts.fold_shapes), size_threshold=threshold,
                                 should_exclude_node=exclude, partitioning="basic", error_ok=True)
            tensors = graph.tensors()
            folded = sorted(n for n in computed if n in tensors and isinstance(tensors[n], gs.Constant))
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            out = gs.export_onnx(graph, do_type_check=False)
        _keep_model_fields(model, out)
        removed = _graph.count_nodes(model) - _graph.count_nodes(out)
        return out, {
            "constants_created": len(folded),
            "constant_nodes_lowered": len(lowered),
            "nodes_removed": removed,
            "excluded_weight_readers": len(excluded),
            "initializers": len(out.graph.initializer),
        }


def _const_nbytes(const) -> int:
    shape = const.shape or ()
    try:
        itemsize = np.dtype(const.dtype).itemsize
    except TypeError:
        itemsize = 4
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def _keep_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """graphsurgeon rebuilds the ModelProto: carry over what it does not preserve."""
    dst.ir_version = src.ir_version
    dst.producer_name = src.producer_name
    dst.producer_version = src.producer_version
    dst.domain = src.domain
    dst.model_version = src.model_version
    dst.doc_string = src.doc_string
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    versions = {op.domain: op.version for op in src.opset_import}
    for op in dst.opset_import:
        if op.domain in versions:
            op.version = versions[op.domain]
