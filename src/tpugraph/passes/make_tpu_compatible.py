"""Any ONNX graph -> what tpu-mlir 1.30 loads: opset <= 17, IR <= 9, supported ops only, fp32 I/O."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from . import _graph
from .base import GraphPass, PassContext, PassFailed

log = logging.getLogger(__name__)

TPU_MLIR_VERSION = "1.30.2"
# The keys of tpu_mlir/python/transform/OnnxConverter.py `onnxop_factory` in tpu-mlir 1.30.2: its
# ONNX frontend converts exactly these op types (any domain check is by op type only) and raises
# "Op not support" for anything else. GELU, DivConst, MeanStdScale, ... are names its own graph
# optimizer produces; they are listed because the frontend accepts them.
TPU_MLIR_ONNX_OPS = frozenset({
    "Abs", "Acos", "AdaptiveAvgPool", "Add", "And", "ArgMax", "ArgMin", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Clip", "Concat", "ConcatVolume", "Constant",
    "ConstantOfShape", "Conv", "ConvBwd_Weight", "ConvTranspose", "Correlation", "Cos", "Cosh",
    "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "DivConst", "Dropout", "Einsum", "Elu",
    "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "GELU", "GRU", "Gather", "GatherElements",
    "GatherND", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
    "GroupNormalization", "HardSigmoid", "HardSwish", "Identity", "If", "InstanceNormalization", "LRN",
    "LSTM", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop",
    "MatMul", "Max", "MaxPool", "MeanStdScale", "Min", "Mod", "Mul", "Neg", "Nms", "NonMaxSuppression",
    "NonZero", "Not", "OneHot", "Or", "PRelu", "Pad", "PixelNormalization", "Pow", "QuantizeLinear",
    "RandomNormalLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceMax",
    "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "Relu", "Reshape", "Resize",
    "ReverseSequence", "RoiAlign", "Round", "Rsqrt", "ScatterElements", "ScatterND", "SelectiveScan",
    "Shape", "Sigmoid", "Sign", "Sin", "Sinh", "Slice", "Softmax", "Softplus", "Softsign",
    "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "Tile", "TopK",
    "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
})

MIN_TARGET_OPSET = 13  # the downgrade rules below cover the op changes from opset 13 upward
T = onnx.TensorProto
_NON_FP32_FLOATS = {T.FLOAT16: "float16", T.BFLOAT16: "bfloat16", T.DOUBLE: "float64"}
for _name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT4E2M1", "FLOAT8E8M0"):
    if hasattr(T, _name):
        _NON_FP32_FLOATS[getattr(T, _name)] = _name.lower()
# element types newer than an IR version: the IR version they need
_TYPE_MIN_IR = {getattr(T, n): ir for n, ir in (
    ("FLOAT8E4M3FN", 9), ("FLOAT8E4M3FNUZ", 9), ("FLOAT8E5M2", 9), ("FLOAT8E5M2FNUZ", 9),
    ("UINT4", 10), ("INT4", 10), ("FLOAT4E2M1", 11), ("FLOAT8E8M0", 12), ("UINT2", 13), ("INT2", 13),
) if hasattr(T, n)}

_REDUCE_AXES_INPUT_SINCE_18 = frozenset({
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
})


class MakeTpuCompatible(GraphPass):
    name = "tpu_compat"
    summary = f"Bring the graph to what tpu-mlir {TPU_MLIR_VERSION} loads: opset <= 17, IR <= 9, its op set, fp32 I/O"
    @dataclass(frozen=True)
    class Options:
        max_opset: int = 17
        max_ir_version: int = 9
        allow_unsupported_ops: bool = False
        allow_non_fp32_io: bool = False

    def validate(self) -> None:
        from tpugraph.errors import UsageError

        if not MIN_TARGET_OPSET <= int(self.opts.max_opset) <= 17:
            raise UsageError(f"tpu_compat: max_opset must be between {MIN_TARGET_OPSET} and 17 "
                             "(tpu-mlir rejects opset-18 Reduce ops)")
        if not 3 <= int(self.opts.max_ir_version) <= 9:
            raise UsageError("tpu_compat: max_ir_version must be between 3 and 9 (tpu-mlir pins onnx 1.14)")

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
        details: dict[str, Any] = {}
        opset_before = _graph.default_opset(model)
        target = int(self.opts.max_opset)
        converted: dict[str, int] = {}
        if opset_before > target:
            converted = _Downgrade(model, opset_before, target).run()
            _graph.set_default_opset(model, target)
            _validate_types(model, target)
        details["opset"] = [opset_before, _graph.default_opset(model)]
        details["converted_ops"] = converted
        details["ir_version"] = [model.ir_version, _fix_ir_version(model, int(self.opts.max_ir_version), details)]
        problems: list[str] = []
        unsupported = _unsupported_ops(model)
        details["unsupported_ops"] = unsupported
        if unsupported and not self.opts.allow_unsupported_ops:
            listed = ", ".join(f"{op} x{n}" for op, n in unsupported.items())
            problems.append(f"ops tpu-mlir {TPU_MLIR_VERSION} cannot convert: {listed}")
        bad_io = {k: v for k, v in _non_fp32_io(model.graph).items() if k not in ctx.opaque_inputs}
        details["non_fp32_io"] = bad_io
        if bad_io and not self.opts.allow_non_fp32_io:
            problems.append("float I/O must be float32: " + ", ".join(f"{k} is {v}" for k, v in bad_io.items()))
        if problems:
            raise PassFailed("; ".join(problems))
        return model, details


def _fix_ir_version(model: onnx.ModelProto, max_ir: int, details: dict[str, Any]) -> int:
    if model.ir_version <= max_ir:
        return model.ir_version
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    types = _used_elem_types(model)
    for t in types:
        needed = max(needed, _TYPE_MIN_IR.get(t, 3))
    if needed > max_ir:
        raise PassFailed(f"the graph needs IR version {needed} (opset or element types) but tpu-mlir reads <= {max_ir}")
    details["metadata_stripped"] = _strip_ir10_fields(model)
    model.ir_version = needed
    return needed


def _used_elem_types(model: onnx.ModelProto) -> set[int]:
    out: set[int] = set()
    for g in _graph.iter_graphs(model.graph):
        out.update(t.data_type for t in g.initializer)
        for v in (*g.input, *g.output, *g.value_info):
            if v.type.HasField("tensor_type"):
                out.add(v.type.tensor_type.elem_type)
        for n in g.node:
            for a in n.attribute:
                if a.name == "to" and a.type == onnx.AttributeProto.INT:
                    out.add(a.i)
                if a.HasField("t"):
                    out.add(a.t.data_type)
    return out


def _strip_ir10_fields(model: onnx.ModelProto) -> int:
    """metadata_props on nodes, graphs, values and tensors exist from IR 10; older readers do not know them."""
    count = 0
    for g in _graph.iter_graphs(model.graph):
        for item in (g, *g.node, *g.input, *g.output, *g.value_info, *g.initializer):
            if len(item.metadata_props):
                count += len(item.metadata_props)
                del item.metadata_props[:]
    for f in model.functions:
        if f.overload:
            raise PassFailed(f"local function '{f.name}' uses an overload (IR 10); inline it first")
        for n in f.node:
            count += len(n.metadata_props)
            del n.metadata_props[:]
        f.ClearField("value_info")
    return count


def unsupported_ops(op_types: Iterable[str]) -> set[str]:
    """The op types tpu-mlir's ONNX frontend cannot convert ("domain::Op" for non-default domains)."""
    out: set[str] = set()
    for op in op_types:
        domain, _, name = op.rpartition("::")
        if domain not in ("", "ai.onnx") or name not in TPU_MLIR_ONNX_OPS:
            out.add(op)
    return out


def _unsupported_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in _graph.iter_nodes(model.graph):
        if node.domain in ("", "ai.onnx") and node.op_type in TPU_MLIR_ONNX_OPS:
            continue
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _non_fp32_io(graph: onnx.GraphProto) -> dict[str, str]:
    bad: dict[str, str] = {}
    inits = {t.name for t in graph.initializer}
    for v in (*graph.input, *graph.output):
        if v.name in inits or not v.type.HasField("tensor_type"):
            continue
        t = v.type.tensor_type.elem_type
        if t in _NON_FP32_FLOATS:
            bad[v.name] = _NON_FP32_FLOATS[t]
    return bad


def _validate_types(model: onnx.ModelProto, target: int) -> None:
    probe = _graph.skeleton(model)
    try:
        _graph.infer_shapes(probe, strict=True, data_prop=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PassFailed(f"the graph does not validate at opset {target} after conversion: {first}") from exc


class _Downgrade:
    """Rewrites nodes whose operator changed between the target opset and the model's opset."""

    def __init__(self, model: onnx.ModelProto, current: int, target: int) -> None:
        self.model = model
        self.graph = model.graph
        self.current = current
        self.target = target
        self.constants = _graph.constant_tensors(self.graph)
        probe = _graph.skeleton(model)
        try:
            _graph.infer_shapes(probe, strict=False, data_prop=True)
        except Exception as exc:
            log.debug("shape inference before downgrade failed: %s", exc)
        self.types = _graph.elem_types(probe)
        self.shapes = {v.name: _graph.static_shape(v) for v in (*probe.graph.input, *probe.graph.value_info,
                                                               *probe.graph.output)}
        self.taken = _graph.all_tensor_names(self.graph)
        self.new_initializers: list[onnx.TensorProto] = []

    def run(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        rewritten: list[onnx.NodeProto] = []
        for g in _graph.iter_graphs(self.graph):
            if g is not self.graph and any(self._changed(n) for n in g.node):
                raise PassFailed("subgraph (If/Loop/Scan body) ops changed after the target opset; "
                                 "cannot convert subgraphs")
        for node in self.graph.node:
            if not self._changed(node):
                rewritten.append(node)
                continue
            replacement = self._convert(node)
            rewritten.extend(replacement)
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if counts:
            nodes = [_graph.copy_node(n) for n in rewritten]
            del self.graph.node[:]
            self.graph.node.extend(nodes)
            self.graph.initializer.extend(self.new_initializers)
        return dict(sorted(counts.items()))

    def _changed(self, node: onnx.NodeProto) -> bool:
        if node.domain not in ("", "ai.onnx"):
            return False
        new = _schema(node.op_type, self.current)
        old = _schema(node.op_type, self.target)
        if new is None:
            raise PassFailed(f"op '{node.op_type}' is not an ONNX opset-{self.current} operator")
        return old is None or old.since_version != new.since_version

    def _convert(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        op = node.op_type
        if op in _REDUCE_AXES_INPUT_SINCE_18 and self.target < 18:
            return self._reduce_axes_to_attribute(node)
        handler: Callable[[onnx.NodeProto], list[onnx.NodeProto]] | None = {
            "Split": self._split,
            "Gelu": self._gelu,
            "Cast": self._cast,
            "Reshape": self._reshape,
        }.get(op)
        if handler is not None:
            nodes = handler(node)
        else:
            refusal = _semantic_change(node, self.current, self.target)
            if refusal:
                raise PassFailed(refusal)
            nodes = [node]
        for n in nodes:
            self._require_old_form(n)
        return nodes

    def _require_old_form(self, node: onnx.NodeProto) -> None:
        """PassFailed unless the node is valid as it stands under the target opset's operator version."""
        old = _schema(node.op_type, self.target)
        if old is None:
            raise PassFailed(f"op '{node.op_type}' (opset {self.current}) has no opset-{self.target} form")
        extra = [a.name for a in node.attribute if a.name not in old.attributes]
        if extra:
            raise PassFailed(f"'{node.name or node.op_type}' ({node.op_type}) uses attribute(s) {', '.join(extra)} "
                             f"that opset {self.target} does not have")
        if len(node.input) > old.max_input or len(node.output) > old.max_output:
            raise PassFailed(f"'{node.name or node.op_type}' ({node.op_type}) uses more inputs/outputs than "
                             f"opset {self.target} allows")

    def _constant(self, name: str) -> np.ndarray:
        t = self.constants.get(name)
        if t is None:
            raise PassFailed(f"input '{name}' must be a constant to convert to opset {self.target}")
        return numpy_helper.to_array(t)

    def _reduce_axes_to_attribute(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        noop = attrs.pop("noop_with_empty_axes", 0)
        axes = None
        if len(node.input) > 1 and node.input[1]:
            axes = [int(a) for a in self._constant(node.input[1]).reshape(-1)]
        if not axes:
            if noop:
                return [onnx.helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)]
            axes = None
        if axes is not None:
            attrs["axes"] = axes
        new = onnx.helper.make_node(node.op_type, [node.input[0]], list(node.output), name=node.name, **attrs)
        return [new]

    def _split(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n = attrs.pop("num_outputs", None)
        inputs = list(node.input)
        if n is not None:
            axis = int(attrs.get("axis", 0))
            shape = self.shapes.get(node.input[0])
            if shape is None:
                raise PassFailed(f"Split '{node.name}' uses num_outputs on a tensor of unknown shape")
            size = shape[axis]
            chunk = math.ceil(size / n)
            if size % n:
                sizes = [chunk] * (size // chunk) + ([size % chunk] if size % chunk else [])
                if len(sizes) != n:
                    raise PassFailed(f"Split '{node.name}' of {size} into {n} uneven parts has no opset-17 form")
                name = _graph.unique_name(f"{node.name or 'split'}_sizes", self.taken)
                self.new_initializers.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), name))
                inputs = [inputs[0], name]
        return [onnx.helper.make_node("Split", inputs, list(node.output), name=node.name, **attrs)]

    def _gelu(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        approx = attrs.get("approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else approx
        x, y = node.input[0], node.output[0]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.types.get(x, T.FLOAT))
        base = node.name or "gelu"

        def const(tag: str, value: float) -> str:
            name = _graph.unique_name(f"{base}_{tag}", self.taken)
            self.new_initializers.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
            return name

        def tmp(tag: str) -> str:
            return _graph.unique_name(f"{base}_{tag}", self.taken)

        half, one = const("half", 0.5), const("one", 1.0)
        mk = onnx.helper.make_node
        if approx == "tanh":
            c, k = const("sqrt_2_over_pi", math.sqrt(2 / math.pi)), const("coef", 0.044715)
            x3, kx3, inner, scaled, th, onep, hx = (tmp(t) for t in ("x3", "kx3", "inner", "scaled", "tanh",
                                                                   "one_plus", "half_x"))
            three = const("three", 3.0)
            return [mk("Pow", [x, three], [x3]), mk("Mul", [x3, k], [kx3]), mk("Add", [x, kx3], [inner]),
                    mk("Mul", [inner, c], [scaled]), mk("Tanh", [scaled], [th]), mk("Add", [th, one], [onep]),
                    mk("Mul", [x, half], [hx]), mk("Mul", [hx, onep], [y], name=node.name)]
        if approx != "none":
            raise PassFailed(f"Gelu '{node.name}' has unknown approximate='{approx}'")
        inv_sqrt2 = const("inv_sqrt2", 1 / math.sqrt(2))
        scaled, erf, onep, hx = (tmp(t) for t in ("scaled", "erf", "one_plus", "half_x"))
        return [mk("Mul", [x, inv_sqrt2], [scaled]), mk("Erf", [scaled], [erf]), mk("Add", [erf, one], [onep]),
                mk("Mul", [x, half], [hx]), mk("Mul", [hx, onep], [y], name=node.name)]

    def _cast(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("to") in _TYPE_MIN_IR and _TYPE_MIN_IR[attrs["to"]] > 8:
            raise PassFailed(f"Cast '{node.name}' casts to a type opset {self.target} does not have")
        attrs.pop("saturate", None)  # only meaningful for float8 targets
        attrs.pop("round_mode", None)
        return [onnx.helper.make_node("Cast", list(node.input), list(node.output), name=node.name, **attrs)]

    def _reshape(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if self.target < 14 and attrs.get("allowzero", 0):
            raise PassFailed(f"Reshape '{node.name}' uses allowzero=1, which opset {self.target} does not have")
        if self.target < 14:
            attrs.pop("allowzero", None)
        return [onnx.helper.make_node("Reshape", list(node.input), list(node.output), name=node.name, **attrs)]


def _schema(op: str, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return None


def _semantic_change(node: onnx.NodeProto, current: int, target: int) -> str | None:
    """Changes the attribute/input check cannot see: same signature, different meaning."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    reduction = attrs.get("reduction", b"none")
    if op in ("ScatterElements", "ScatterND") and reduction in (b"min", b"max") and target < 18:
        return f"{op} '{node.name}' uses reduction={reduction.decode()}, new in opset 18"
    if op == "Pad" and (attrs.get("mode") == b"wrap" or (len(node.input) > 3 and node.input[3])) and target < 19:
        return f"Pad '{node.name}' uses wrap mode or an axes input, new in opsets 18/19"
    if op == "GroupNormalization" and current >= 21 > target:
        return f"GroupNormalization '{node.name}' changed its scale/bias meaning in opset 21; cannot downgrade"
    if op == "Resize" and target < 18:
        for key, default in (("antialias", 0), ("keep_aspect_ratio_policy", b"stretch")):
            if key in attrs and attrs[key] != default:
                return f"Resize '{node.name}' uses {key}, new in opset 18"
        if attrs.get("coordinate_transformation_mode") == b"half_pixel_symmetric":
            return f"Resize '{node.name}' uses half_pixel_symmetric, new in opset 19"
    return None
