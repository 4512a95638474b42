"""Dynamic dims -> the static shapes of the segment spec, with shape-computing chains folded to constants."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from . import _graph
from .base import GraphPass, PassContext, PassFailed

log = logging.getLogger(__name__)

# Ops that appear in shape computations (Shape -> Gather -> Unsqueeze -> Concat -> Reshape, masks
# built with ConstantOfShape/Range/Expand...). Only these are evaluated here; general constant
# folding of weights and float tables is fold_constants' job.
SHAPE_OPS = frozenset({
    "Shape", "Size", "Gather", "GatherElements", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape",
    "Flatten", "Transpose", "Expand", "Tile", "Cast", "CastLike", "ConstantOfShape", "Range", "Identity",
    "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Floor", "Ceil", "Min", "Max", "Sum",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "Where",
    "ReduceProd", "ReduceSum", "ReduceMin", "ReduceMax", "Trilu", "CumSum", "Sqrt", "Pow",
})


class FixStaticShapes(GraphPass):
    name = "fix_static_shapes"
    summary = "Pin every graph input/output to the segment's static shape, fold shape chains, require static value_info"
    @dataclass(frozen=True)
    class Options:
        max_fold_bytes: int = 1 << 20
        max_rounds: int = 8

    def validate(self) -> None:
        from tpugraph.errors import UsageError

        if int(self.opts.max_fold_bytes) < 0 or int(self.opts.max_rounds) < 1:
            raise UsageError("fix_static_shapes: max_fold_bytes must be >= 0 and max_rounds >= 1")

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
        graph = model.graph
        dims_fixed = _pin_io_shapes(graph, ctx.shapes)
        folded: dict[str, int] = {}
        dead = _graph.prune_dead_nodes(graph)
        rounds = 0
        for rounds in range(1, int(self.opts.max_rounds) + 1):
            # each round: shapes from inference let Shape nodes fold, folded shape tensors make
            # more shapes inferable (Reshape targets, ConstantOfShape sizes) for the next round
            _infer(model)
            done = _fold_shape_chains(model, int(self.opts.max_fold_bytes))
            if not done:
                break
            for op, n in done.items():
                folded[op] = folded.get(op, 0) + n
            dead += _graph.prune_dead_nodes(graph)
        else:
            _infer(model)
        _require_static(graph)
        return model, {
            "dims_fixed": dims_fixed,
            "folded": dict(sorted(folded.items())),
            "folded_total": sum(folded.values()),
            "dead_removed": dead,
            "rounds": rounds,
            "value_info": len(graph.value_info),
        }


def _infer(model: onnx.ModelProto) -> None:
    try:
        _graph.infer_shapes(model, strict=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError / ValidationError with multi-line text
        raise PassFailed(f"shape inference failed: {str(exc).strip().splitlines()[0]}") from exc


def _io_values(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in inits] + list(graph.output)


def _pin_io_shapes(graph: onnx.GraphProto, spec: dict[str, tuple[int, ...]]) -> int:
    """Write the spec's shapes into the graph I/O; returns how many dims were not already static."""
    values = _io_values(graph)
    present = {v.name for v in values}
    missing = sorted(set(spec) - present)
    if missing:
        raise PassFailed(f"the segment spec names {', '.join(missing)} but the graph has no such input/output "
                         f"(graph I/O: {', '.join(v.name for v in values)})")
    fixed = 0
    unpinned: list[str] = []
    for v in values:
        if not v.type.HasField("tensor_type"):
            raise PassFailed(f"graph input/output '{v.name}' is not a tensor")
        if v.name not in spec:
            if _graph.static_shape(v) is None:
                unpinned.append(v.name)
            continue
        want = tuple(int(d) for d in spec[v.name])
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            dims = tt.shape.dim
            if len(dims) != len(want):
                raise PassFailed(f"'{v.name}' has rank {len(dims)} in the graph but the spec says {list(want)}")
            for i, (d, w) in enumerate(zip(dims, want)):
                if d.HasField("dim_value") and d.dim_value != w:
                    raise PassFailed(f"'{v.name}' dim {i} is {d.dim_value} in the graph but the spec says {w}")
        fixed += sum(1 for d in tt.shape.dim if not d.HasField("dim_value")) if tt.HasField("shape") else len(want)
        tt.ClearField("shape")
        tt.shape.SetInParent()
        for w in want:
            tt.shape.dim.add().dim_value = w
    if unpinned:
        raise PassFailed(f"graph input/output {', '.join(unpinned)} has dynamic dims and no static shape "
                         "in the segment spec")
    return fixed


def _fold_shape_chains(model: onnx.ModelProto, max_bytes: int) -> dict[str, int]:
    """Replace shape-computing nodes whose inputs are all known by initializers, in one sweep."""
    graph = model.graph
    opset = _graph.default_opset(model)
    shapes = {v.name: _graph.static_shape(v) for v in (*graph.input, *graph.value_info, *graph.output)}
    graph_outputs = {o.name for o in graph.output}
    known: dict[str, np.ndarray] = {}
    for name, t in _graph.constant_tensors(graph).items():
        if not _graph.is_external(t) and _graph.tensor_nbytes(t) <= max_bytes:
            known[name] = numpy_helper.to_array(t)
    folded: dict[str, int] = {}
    keep: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for node in graph.node:
        values = _evaluate(node, known, shapes, opset, max_bytes) if _foldable(node, graph_outputs) else None
        if values is None:
            keep.append(node)
            continue
        for name, value in zip(node.output, values):
            known[name] = value
            new_inits.append(numpy_helper.from_array(value, name))
        folded[node.op_type] = folded.get(node.op_type, 0) + 1
    if folded:
        kept = [_graph.copy_node(n) for n in keep]
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(new_inits)
        _graph.drop_stale_value_info(graph)
        log.debug("folded %s", folded)
    return folded


def _foldable(node: onnx.NodeProto, graph_outputs: set[str]) -> bool:
    return (node.domain in ("", "ai.onnx") and node.op_type in SHAPE_OPS
            and not _graph.subgraphs(node) and not any(o in graph_outputs for o in node.output))


def _evaluate(node: onnx.NodeProto, known: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...] | None],
              opset: int, max_bytes: int) -> list[np.ndarray] | None:
    if node.op_type in ("Shape", "Size"):
        shape = shapes.get(node.input[0])
        if shape is None:
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", None)
        return [np.array(shape[start:end], dtype=np.int64)]
    inputs = [i for i in node.input if i]
    if not inputs or not all(i in known for i in inputs):
        return None
    for out in node.output:  # refuse before computing anything big (ConstantOfShape of a large mask)
        shape = shapes.get(out)
        if shape is not None and int(np.prod(shape, dtype=np.int64)) * 8 > max_bytes:
            return None
    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(node, opsets={"": opset})
        results = evaluator.run(None, {i: known[i] for i in inputs})
    except Exception as exc:  # an op the reference runtime cannot evaluate stays in the graph
        log.debug("cannot evaluate %s (%s): %s", node.name, node.op_type, exc)
        return None
    values = [np.asarray(r) for r in results]
    if any(v.nbytes > max_bytes for v in values):
        return None
    return values


def _require_static(graph: onnx.GraphProto) -> None:
    infos = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    inits = {t.name for t in graph.initializer}
    dynamic: dict[str, str] = {}
    for node in graph.node:
        for out in node.output:
            if out and out not in inits:
                info = infos.get(out)
                if info is None or _graph.static_shape(info) is None:
                    dynamic[out] = f"{out} ({node.op_type}: {_describe(info)})"
    for v in graph.output:
        if v.name not in dynamic and _graph.static_shape(v) is None:
            dynamic[v.name] = f"{v.name} (graph output: {_describe(v)})"
    if dynamic:
        items = list(dynamic.values())
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        raise PassFailed(f"{len(items)} value(s) stay dynamic after shape inference: {'; '.join(items[:5])}{more}")


def _describe(info: onnx.ValueInfoProto | None) -> str:
    if info is None or not info.type.tensor_type.HasField("shape"):
        return "shape unknown"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
            for d in info.type.tensor_type.shape.dim]
    return "[" + ", ".join(dims) + "]"
