"""Nodes, initializers, value_info and functions nothing reads -> removed (graph inputs always kept)."""

from __future__ import annotations

from typing import Any

import onnx

from . import _graph
from .base import GraphPass, PassContext


class RemoveUnused(GraphPass):
    name = "remove_unused"
    summary = "Remove dead nodes, unread initializers, stale value_info and unused local functions"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
        graph = model.graph
        nodes = _graph.prune_dead_nodes(graph)
        read: set[str] = {o.name for o in graph.output}
        for node in graph.node:
            read |= _graph.node_reads(node)
        # graph inputs are the segment's interface (the runtime feeds by position): never removed,
        # and an initializer that doubles as a graph input is an overridable input, kept as well
        inputs = {v.name for v in graph.input}
        doomed = [i for i, t in enumerate(graph.initializer) if t.name not in read and t.name not in inputs]
        for i in reversed(doomed):
            del graph.initializer[i]
        value_info = _graph.drop_stale_value_info(graph)
        functions = _remove_unused_functions(model)
        return model, {"nodes": nodes, "initializers": len(doomed), "value_info": value_info,
                       "functions": functions}


def _remove_unused_functions(model: onnx.ModelProto) -> int:
    if not model.functions:
        return 0
    by_key = {(f.domain, f.name): f for f in model.functions}
    used: set[tuple[str, str]] = set()
    pending = [n for n in _graph.iter_nodes(model.graph)]
    while pending:
        node = pending.pop()
        key = (node.domain, node.op_type)
        if key in by_key and key not in used:
            used.add(key)
            pending.extend(by_key[key].node)
    doomed = [i for i, f in enumerate(model.functions) if (f.domain, f.name) not in used]
    for i in reversed(doomed):
        del model.functions[i]
    return len(doomed)
