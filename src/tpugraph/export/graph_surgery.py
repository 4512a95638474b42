"""Surgery on a freshly exported segment graph: parameters traced as inputs -> initializers or set-aside
weights, contract inputs the tracer dropped put back, inputs no node reads found."""

from __future__ import annotations

import numpy as np
import torch

from ..contract.segments import SegmentSpec
from .model_parts import ModelParts


def _elem_type(t: torch.Tensor) -> int:
    from onnx import helper

    if t.dtype == torch.bfloat16:
        return helper.TensorProto.BFLOAT16
    return helper.np_dtype_to_tensor_dtype(np.dtype(str(t.dtype).removeprefix("torch.")))


def _lazy_weight(name: str, t: torch.Tensor, transposed: bool = False, parts: ModelParts | None = None):
    """A set-aside weight whose bytes are those of ``t`` (or of its transpose), made when written. For a
    placeholder ``t`` they are read from the checkpoint then, and the weight names its source (so a file
    holding the same source already stores it without reading it again)."""
    from .external_data import LazyWeight, tensor_array

    key = parts.placeholder_key(t) if parts is not None else None
    dims = list(t.shape[::-1] if transposed else t.shape)
    elem = _elem_type(t)
    if key is None:
        return LazyWeight(name, elem, dims, lambda: tensor_array(t, transposed=transposed))
    source = (key, "transpose" if transposed else "identity", tuple(dims), elem)
    return LazyWeight(name, elem, dims, lambda: tensor_array(parts.weights.get(key), t.dtype, transposed), source)


def params_to_weights(model, params: dict[str, torch.Tensor], set_aside_bytes: int,
                       parts: ModelParts | None = None) -> list:
    """Graph inputs that are parameters -> initializers (the small ones) or set-aside weights (the rest).

    A Linear traced with its weight as an input reads ``Transpose(W)``: for a set-aside W that transpose
    is folded here (the weight is set aside transposed, as constant folding would have stored it)."""
    from onnx import helper

    graph = model.graph
    big = {name: t for name, t in params.items() if t.numel() * t.element_size() >= set_aside_bytes}
    folded: dict[str, tuple[str, torch.Tensor]] = {}  # transpose output -> (parameter, tensor)
    kept_nodes = []
    for node in graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if node.op_type == "Transpose" and node.input[0] in big and big[node.input[0]].dim() == 2 and perm == [1, 0]:
            folded[node.output[0]] = (node.input[0], big[node.input[0]])
            continue
        kept_nodes.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(kept_nodes)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    weights, inputs = [], []
    for v in graph.input:
        t = params.get(v.name)
        if t is None:
            inputs.append(v)
        elif v.name not in big:
            graph.initializer.append(_lazy_weight(v.name, t).to_proto())
        elif v.name in read:
            weights.append(_lazy_weight(v.name, t, parts=parts))
            inputs.append(v)
    for name, (_, t) in folded.items():
        weights.append(_lazy_weight(name, t, transposed=True, parts=parts))
        inputs.append(helper.make_tensor_value_info(name, _elem_type(t), list(t.shape[::-1])))
    del graph.input[:]
    graph.input.extend(inputs)
    return weights


def unused_graph_inputs(model) -> list[str]:
    """Graph inputs no node reads (and no output passes through): what a NoPE layer does to position_ids.

    Read from the final file rather than remembered from tracing, so it stays true for segments whose
    graph was reused or rewritten by passes."""
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    inits = {i.name for i in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits and v.name not in read]


def restore_unused_inputs(model, spec: SegmentSpec) -> list[str]:
    """Put back contract inputs the tracer dropped because the graph never reads them.

    A NoPE layer (SmolLM3, Cohere2 global layers) ignores position_ids, and torch.onnx leaves unused
    inputs out; the runtime feeds inputs by position, so the file must still declare every one, in order.
    """
    import onnx
    from onnx import helper

    present = {v.name: v for v in model.graph.input}
    missing = [t.name for t in spec.inputs if t.name not in present]
    if not missing:
        return []
    inits = [v for v in model.graph.input if v.name not in {t.name for t in spec.inputs}]
    ordered = []
    for t in spec.inputs:
        if t.name in present:
            ordered.append(present[t.name])
        else:
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            ordered.append(helper.make_tensor_value_info(t.name, elem, list(t.shape)))
    del model.graph.input[:]
    model.graph.input.extend(ordered + inits)
    onnx.checker.check_model(model, full_check=False)
    return missing
