"""Segment I/O names of one convention -> another (llm-tpu, optimum, genie), optionally changing the KV layout."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import onnx

from . import _graph
from .base import GraphPass, PassContext, PassFailed


@dataclass(frozen=True)
class IoConvention:
    """Names of the segment I/O, keyed by their role (the contract's own names); ``{layer}`` = layer index."""

    name: str
    description: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    native_kv_layout: str


_LLM_TPU_INPUTS = {
    "input_ids": "input_ids", "input_states": "input_states", "position_ids": "position_ids",
    "attention_mask": "attention_mask", "history_k": "history_k", "history_v": "history_v",
    "hidden_states": "hidden_states", "m_logits": "m_logits", "top_p": "top_p",
    "temperature": "temperature", "penalty": "penalty",
}
_LLM_TPU_OUTPUTS = {
    "input_embed": "input_embed", "hidden_states": "hidden_states", "past_k": "past_k", "past_v": "past_v",
    "m_logits": "m_logits", "token": "token", "probs": "probs",
}

CONVENTIONS: dict[str, IoConvention] = {
    "llm-tpu": IoConvention(
        "llm-tpu", "Sophgo LLM-TPU demos (the segment contract, ../shared/CONTRACT.md)",
        _LLM_TPU_INPUTS, _LLM_TPU_OUTPUTS, "sequence-major"),
    "optimum": IoConvention(
        "optimum", "Hugging Face optimum / onnxruntime-genai decoder exports",
        {**_LLM_TPU_INPUTS, "input_states": "inputs_embeds", "history_k": "past_key_values.{layer}.key",
         "history_v": "past_key_values.{layer}.value", "hidden_states": "last_hidden_state", "m_logits": "logits"},
        {**_LLM_TPU_OUTPUTS, "input_embed": "inputs_embeds", "hidden_states": "last_hidden_state",
         "past_k": "present.{layer}.key", "past_v": "present.{layer}.value", "m_logits": "logits"},
        "head-major"),
    "genie": IoConvention(
        "genie", "Qualcomm AI Hub / Genie LLM exports (qai_hub_models): per-layer _in/_out KV tensors",
        {**_LLM_TPU_INPUTS, "history_k": "past_key_{layer}_in", "history_v": "past_value_{layer}_in",
         "m_logits": "logits"},
        {**_LLM_TPU_OUTPUTS, "past_k": "past_key_{layer}_out", "past_v": "past_value_{layer}_out",
         "m_logits": "logits"},
        "key-transposed"),
}

# Permutation from the sequence-major layout [1, SEQ, KVH, D]: layout = transpose(seq_major, perm).
KV_LAYOUTS: dict[str, dict[str, tuple[int, ...]]] = {
    "sequence-major": {"k": (0, 1, 2, 3), "v": (0, 1, 2, 3)},  # [1, SEQ, KVH, D]
    "head-major": {"k": (0, 2, 1, 3), "v": (0, 2, 1, 3)},  # [1, KVH, SEQ, D] (Hugging Face)
    "key-transposed": {"k": (0, 2, 3, 1), "v": (0, 2, 1, 3)},  # K [1, KVH, D, SEQ], V [1, KVH, SEQ, D] (Genie)
}
_KV_ROLES = {"history_k": "k", "history_v": "v", "past_k": "k", "past_v": "v"}


def kv_perm(role: str, src_layout: str, dst_layout: str) -> tuple[int, ...]:
    """``perm`` with tensor_in_dst_layout = transpose(tensor_in_src_layout, perm)."""
    kv = _KV_ROLES[role]
    src, dst = KV_LAYOUTS[src_layout][kv], KV_LAYOUTS[dst_layout][kv]
    inv_src = [src.index(i) for i in range(len(src))]
    return tuple(inv_src[d] for d in dst)


@dataclass
class _Rename:
    direction: str  # "input" | "output"
    old: str
    role: str
    new: str = ""
    perm: tuple[int, ...] | None = None


class RenameKvIo(GraphPass):
    name = "rename_kv_io"
    summary = "Rename segment I/O to a naming convention (llm-tpu, optimum, genie); optional KV layout change"
    layer_dependent = True
    @dataclass(frozen=True)
    class Options:
        convention: str = "llm-tpu"
        source: str = "llm-tpu"
        kv_layout: str = "keep"
        source_kv_layout: str = "native"
        strict: bool = False

    def validate(self) -> None:
        from tpugraph.errors import UsageError

        for key in ("convention", "source"):
            if getattr(self.opts, key) not in CONVENTIONS:
                raise UsageError(f"rename_kv_io: unknown {key} '{getattr(self.opts, key)}' "
                                 f"(conventions: {', '.join(CONVENTIONS)})")
        layouts = ", ".join(["keep", "native", *KV_LAYOUTS])
        if self.opts.kv_layout not in ("keep", "native", *KV_LAYOUTS):
            raise UsageError(f"rename_kv_io: unknown kv_layout '{self.opts.kv_layout}' (layouts: {layouts})")
        if self.opts.source_kv_layout not in ("native", *KV_LAYOUTS):
            raise UsageError(f"rename_kv_io: unknown source_kv_layout '{self.opts.source_kv_layout}'")

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
        src, dst = CONVENTIONS[self.opts.source], CONVENTIONS[self.opts.convention]
        src_layout = src.native_kv_layout if self.opts.source_kv_layout == "native" else self.opts.source_kv_layout
        dst_layout = {"keep": src_layout, "native": dst.native_kv_layout}.get(self.opts.kv_layout,
                                                                              self.opts.kv_layout)
        graph = model.graph
        plan, unmapped = _plan(graph, src, dst, ctx.layer)
        if unmapped and self.opts.strict:
            raise PassFailed(f"graph I/O {', '.join(unmapped)} is not part of the '{src.name}' convention")
        if src_layout != dst_layout:
            for r in plan:
                if r.role in _KV_ROLES:
                    perm = kv_perm(r.role, src_layout, dst_layout)
                    r.perm = None if perm == tuple(range(4)) else perm
        finals = [r.new for r in plan] + [n for n in _io_names(graph) if n in unmapped]
        if len(set(finals)) != len(finals):
            raise PassFailed(f"convention '{dst.name}' gives two graph inputs/outputs the same name: {finals}")
        _apply_renames(graph, plan)
        io_perms: dict[str, dict[str, list[int]]] = {"inputs": {}, "outputs": {}}
        for r in plan:
            if r.perm is not None:
                _change_layout(graph, r)
                io_perms["inputs" if r.direction == "input" else "outputs"][r.new] = list(r.perm)
        details: dict[str, Any] = {
            "convention": dst.name,
            "source": src.name,
            "mapping": {r.old: r.new for r in plan},
            "renamed": sum(1 for r in plan if r.old != r.new),
            "kv_layout": dst_layout,
            "transposed": sum(1 for r in plan if r.perm is not None),
        }
        if unmapped:
            details["unmapped"] = unmapped
        if any(io_perms.values()):
            details["io_perms"] = io_perms
        return model, details


def _io_names(graph: onnx.GraphProto) -> list[str]:
    return _graph.graph_input_names(graph) + [o.name for o in graph.output]


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$")


def _plan(graph: onnx.GraphProto, src: IoConvention, dst: IoConvention,
          layer: int | None) -> tuple[list[_Rename], list[str]]:
    plan: list[_Rename] = []
    unmapped: list[str] = []
    directions = (("input", _graph.graph_input_names(graph), src.inputs, dst.inputs),
                  ("output", [o.name for o in graph.output], src.outputs, dst.outputs))
    for direction, names, src_table, dst_table in directions:
        for name in names:
            found = None
            for role, template in src_table.items():
                m = _template_regex(template).match(name)
                if m:
                    found = (role, int(m.group(1)) if m.groups() else None)
                    break
            if found is None:
                unmapped.append(name)
                continue
            role, named_layer = found
            if named_layer is not None and layer is not None and named_layer != layer:
                raise PassFailed(f"'{name}' names layer {named_layer} but the segment is layer {layer}")
            the_layer = named_layer if named_layer is not None else layer
            template = dst_table[role]
            if "{layer}" in template and the_layer is None:
                raise PassFailed(f"renaming '{name}' to '{template}' needs the layer index, "
                                 "and the segment has none (PassContext.layer)")
            plan.append(_Rename(direction, name, role, template.format(layer=the_layer)))
    return plan, unmapped


def _apply_renames(graph: onnx.GraphProto, plan: list[_Rename]) -> None:
    """Two phases through temporary names, so swaps and chains of renames cannot collide."""
    changing = [r for r in plan if r.old != r.new]
    if not changing:
        return
    taken = _graph.all_tensor_names(graph)
    temps = []
    for r in changing:
        tmp = _graph.unique_name(f"__rename_{r.old}", taken)
        _graph.rename_tensor(graph, r.old, tmp)
        temps.append(tmp)
    taken = _graph.all_tensor_names(graph)
    for r, tmp in zip(changing, temps):
        if r.new in taken:  # an internal tensor already uses the wanted name: it steps aside
            _graph.rename_tensor(graph, r.new, _graph.unique_name(f"{r.new}_internal", taken))
        _graph.rename_tensor(graph, tmp, r.new)
        taken.add(r.new)


def _change_layout(graph: onnx.GraphProto, r: _Rename) -> None:
    assert r.perm is not None
    perm = list(r.perm)
    value = next(v for v in (graph.input if r.direction == "input" else graph.output) if v.name == r.new)
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(perm):
        raise PassFailed(f"KV tensor '{r.new}' has rank {len(dims)}, expected {len(perm)}")
    old_dims = [onnx.TensorShapeProto.Dimension() for _ in dims]
    for i, d in enumerate(dims):
        old_dims[i].CopyFrom(d)
    for i, p in enumerate(perm):
        dims[i].CopyFrom(old_dims[p])
    taken = _graph.all_tensor_names(graph)
    inner = _graph.unique_name(f"{r.new}_{'in' if r.direction == 'input' else 'out'}_layout", taken)
    if r.direction == "input":
        # the graph still computes in the source layout: convert the new input back at its entry
        back = [perm.index(i) for i in range(len(perm))]
        _graph.replace_uses(graph, r.new, inner)
        node = onnx.helper.make_node("Transpose", [r.new], [inner], name=f"{inner}_Transpose", perm=back)
        graph.node.insert(0, node)
    else:
        producer = next((n for n in graph.node if r.new in n.output), None)
        if producer is None:
            raise PassFailed(f"output '{r.new}' is not produced by any node; cannot change its layout")
        outputs = producer.output
        outputs[list(outputs).index(r.new)] = inner
        _graph.replace_uses(graph, r.new, inner)
        graph.node.append(onnx.helper.make_node("Transpose", [inner], [r.new], name=f"{inner}_Transpose",
                                                perm=perm))
    stale = [v for v in graph.value_info if v.name == r.new]
    for v in stale:  # described the tensor before the layout change; shape inference recreates it
        graph.value_info.remove(v)
