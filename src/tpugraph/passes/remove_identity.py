"""Identity, inference Dropout, same-type Cast and lossless Cast round trips -> direct connections."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import onnx

from . import _graph
from .base import GraphPass, PassContext

log = logging.getLogger(__name__)

T = onnx.TensorProto
# Casting a value of the key type to any of these types and back gives the value back exactly.
_LOSSLESS_WIDENING: dict[int, frozenset[int]] = {
    T.BOOL: frozenset({T.INT8, T.UINT8, T.INT16, T.UINT16, T.INT32, T.UINT32, T.INT64, T.UINT64,
                       T.FLOAT16, T.BFLOAT16, T.FLOAT, T.DOUBLE}),
    T.INT8: frozenset({T.INT16, T.INT32, T.INT64, T.FLOAT16, T.FLOAT, T.DOUBLE}),
    T.UINT8: frozenset({T.INT16, T.UINT16, T.INT32, T.UINT32, T.INT64, T.UINT64, T.FLOAT16, T.FLOAT, T.DOUBLE}),
    T.INT16: frozenset({T.INT32, T.INT64, T.FLOAT, T.DOUBLE}),
    T.UINT16: frozenset({T.INT32, T.UINT32, T.INT64, T.UINT64, T.FLOAT, T.DOUBLE}),
    T.INT32: frozenset({T.INT64, T.DOUBLE}),
    T.UINT32: frozenset({T.INT64, T.UINT64, T.DOUBLE}),
    T.FLOAT16: frozenset({T.FLOAT, T.DOUBLE}),
    T.BFLOAT16: frozenset({T.FLOAT, T.DOUBLE}),
    T.FLOAT: frozenset({T.DOUBLE}),
}


class RemoveIdentity(GraphPass):
    name = "remove_identity"
    summary = "Remove Identity, inference-mode Dropout, no-op Cast and lossless Cast round trips"
    @dataclass(frozen=True)
    class Options:
        casts: bool = True

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
        graph = model.graph
        types = _known_types(model) if self.opts.casts else {}
        counts = {"identity": 0, "dropout": 0, "cast_noop": 0, "cast_round_trip": 0, "kept_at_boundary": 0}
        produced = _graph.producers(graph)
        index = 0
        while index < len(graph.node):
            node = graph.node[index]
            kind, source = self._passthrough(node, types, produced)
            if kind is None:
                index += 1
                continue
            if _bypass(graph, index, source, produced):
                counts[kind] += 1
                for name in node.output:
                    if produced.get(name) is node:
                        del produced[name]
                del graph.node[index]
            else:
                counts["kept_at_boundary"] += 1
                index += 1
        dead = _graph.prune_dead_nodes(graph)
        _graph.drop_stale_value_info(graph)
        removed = {k: v for k, v in counts.items() if k != "kept_at_boundary"}
        return model, {**counts, "removed": sum(removed.values()), "dead_removed": dead}

    def _passthrough(self, node: onnx.NodeProto, types: dict[str, int],
                     produced: dict[str, onnx.NodeProto]) -> tuple[str | None, str]:
        """(kind, the tensor the node's output equals) or (None, "") if it computes something."""
        if node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
            return None, ""
        src = node.input[0]
        if node.op_type == "Identity":
            return "identity", src
        if node.op_type == "Dropout":
            # without a training_mode input Dropout is the identity; a used mask output is not
            if len(node.input) <= 2 and (len(node.output) < 2 or not node.output[1]):
                return "dropout", src
            return None, ""
        if node.op_type != "Cast" or not self.opts.casts:
            return None, ""
        to = _attr(node, "to")
        if types.get(src) == to:
            return "cast_noop", src
        first = produced.get(src)
        if first is not None and first.op_type == "Cast" and first.domain in ("", "ai.onnx") and first.input:
            origin = first.input[0]
            mid = _attr(first, "to")
            if types.get(origin) == to and mid in _LOSSLESS_WIDENING.get(to, frozenset()):
                return "cast_round_trip", origin
        return None, ""


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _known_types(model: onnx.ModelProto) -> dict[str, int]:
    probe = _graph.skeleton(model)
    try:
        _graph.infer_shapes(probe, strict=False, data_prop=False)
    except Exception as exc:  # without types only Identity/Dropout are removed
        log.debug("type inference failed: %s", exc)
    return _graph.elem_types(probe)


def _bypass(graph: onnx.GraphProto, index: int, source: str, produced: dict[str, onnx.NodeProto]) -> bool:
    """Make readers of node ``index``'s output read ``source``; False if the graph boundary forbids it.
    ``produced`` (tensor -> producing node) is kept up to date, so it is built once per pass run."""
    out = graph.node[index].output[0]
    graph_outputs = {o.name for o in graph.output}
    if out not in graph_outputs:
        _graph.replace_uses(graph, out, source)
        return True
    # The output name is part of the segment contract: the source tensor takes over the name,
    # which is only possible if a node produces it and it is not itself a boundary tensor.
    boundary = set(_graph.graph_input_names(graph)) | graph_outputs | {t.name for t in graph.initializer}
    producer = produced.get(source)
    if source in boundary or producer is None or producer is graph.node[index]:
        return False
    outputs = producer.output
    outputs[list(outputs).index(source)] = out
    del produced[source]
    produced[out] = producer
    _graph.replace_uses(graph, source, out)
    for v in graph.value_info:
        if v.name == source:
            graph.value_info.remove(v)
            break
    return True
