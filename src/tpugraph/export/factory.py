"""Segment specs -> optimised ONNX models: each distinct layer structure is traced and optimised once,
every other layer of that structure gets its weights swapped into the optimised graph."""

from __future__ import annotations

import hashlib
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import torch
from torch import nn

from ..contract.segments import SegmentKind, SegmentSpec
from ..source.weights import WeightStore
from . import weight_swap
from .exporter import export_segment
from .external_data import LazyWeight
from .model_parts import ModelParts

log = logging.getLogger(__name__)

LAYER_KINDS = (SegmentKind.BLOCK, SegmentKind.BLOCK_KV, SegmentKind.BLOCK_CACHE)
HIDE_MIN_BYTES = 1 << 20  # weights this big sit out the pass chain as opaque graph inputs


def hide_weights(model, min_bytes: int | None = None) -> list:
    """Move the big float initializers out of the graph, declaring each as a graph input of its shape.

    The passes then work on a graph of a few kilobytes: nothing copies, hashes or re-serialises the
    weights, and no pass can fold (and so duplicate) a weight. ``restore_weights`` puts them back.
    """
    from onnx import helper

    min_bytes = HIDE_MIN_BYTES if min_bytes is None else min_bytes
    graph = model.graph
    itemsize = {1: 4, 10: 2, 16: 2, 11: 8}  # FLOAT, FLOAT16, BFLOAT16, DOUBLE
    big = [i for i, t in enumerate(graph.initializer)
           if t.data_type in itemsize and t.data_location != onnx.TensorProto.EXTERNAL
           and math.prod(t.dims) * itemsize[t.data_type] >= min_bytes]
    stash = []
    for i in reversed(big):
        tensor = graph.initializer.pop(i)
        stash.append(tensor)
        graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    stash.reverse()
    return stash


def restore_weights(model, stash: list) -> None:
    """Undo ``hide_weights``: the hidden inputs become initializers again (those a node still reads)."""
    graph = model.graph
    hidden = {t.name for t in stash}
    kept_inputs = [v for v in graph.input if v.name not in hidden]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    read = {name for node in graph.node for name in node.input}
    for tensor in stash:
        if tensor.name in read:
            graph.initializer.append(tensor.to_proto() if isinstance(tensor, LazyWeight) else tensor)


class ProbeWeights:
    """A WeightStore look-alike: the same keys, shapes and dtypes, with distinct random values.

    A graph traced from probe weights shows, by the bytes of each initializer, which parameter it holds.
    """

    def __init__(self, real: WeightStore, seed: int = 0):
        self.real = real
        self.seed = seed
        self._made: dict[str, torch.Tensor] = {}  # kept between clear() calls: one template's probe

    def clear(self) -> None:
        self._made.clear()

    def keys(self) -> list[str]:
        return self.real.keys()

    def shape_and_dtype(self, key: str):
        return self.real.shape_and_dtype(key)

    def __contains__(self, key: str) -> bool:
        return key in self.real

    def get(self, key: str) -> torch.Tensor:
        shape, dtype = self.real.shape_and_dtype(key)
        if dtype not in ("F32", "F16", "BF16", "F64"):
            return self.real.get(key)
        if key not in self._made:
            gen = torch.Generator().manual_seed(self.seed ^ zlib.crc32(key.encode()))
            self._made[key] = torch.randn(shape, generator=gen, dtype=torch.float32)
        return self._made[key]


def module_signature(module: nn.Module) -> str:
    """What makes two decoder layers trace to the same graph: module types, plain attributes (but the
    layer index), parameter shapes/dtypes and buffer values."""
    items: list[Any] = []
    for name, sub in module.named_modules():
        attrs = sorted(
            (k, repr(v)) for k, v in vars(sub).items()
            if not k.startswith("_") and k not in ("layer_idx", "training")
            and isinstance(v, (int, float, str, bool, type(None), tuple))
        )
        items.append((name, type(sub).__name__, attrs))
    for name, p in module.named_parameters():
        items.append((name, tuple(p.shape), str(p.dtype)))
    for name, b in module.named_buffers():
        digest = hashlib.sha256(b.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest() \
            if b.device.type != "meta" else "meta"
        items.append((name, tuple(b.shape), str(b.dtype), digest))
    return hashlib.sha256(repr(items).encode()).hexdigest()


class LayerArrays(Mapping):
    """Parameter name (inside a layer) -> numpy array in the export dtype, read on access."""

    def __init__(self, parts: ModelParts, prefix: str):
        self._parts = parts
        self._prefix = prefix
        self._names = [k[len(prefix):] for k in parts.weights.keys() if k.startswith(prefix)]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.source(name).to(self._parts.dtype).numpy()

    def source_key(self, name: str) -> str:
        """The checkpoint key of a parameter of the layer."""
        return self._prefix + name

    def source(self, name: str) -> torch.Tensor:
        """The parameter as the checkpoint stores it (any float dtype), for a cast fused with a transpose."""
        if name not in self._names:
            raise KeyError(name)
        return self._parts.weights.get(self._prefix + name)

    def __contains__(self, name: object) -> bool:  # without reading the tensor
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class BuiltSegment:
    spec: SegmentSpec
    model: Any  # onnx.ModelProto; the big weights are graph inputs named by ``weights`` (see hide_weights)
    pass_results: list[Any] = field(default_factory=list)
    swapped_from: str | None = None  # the layer whose optimised graph this one reuses
    weights: list = field(default_factory=list)  # onnx.TensorProto set aside from the graph

    def restored(self):
        """The model with its weights back in place as initializers (for writing inline)."""
        restore_weights(self.model, self.weights)
        self.weights = []
        return self.model


@dataclass
class _Template:
    template: weight_swap.WeightTemplate | None
    results: list[Any]
    source_segment: str


class SegmentFactory:
    """Builds one optimised segment at a time (see module docstring)."""

    def __init__(self, parts: ModelParts, chain: list, seq: int, int_dtype: str, work_dir: Path | None,
                 weight_swap: bool = True):
        self.parts = parts
        self.chain = chain
        self.on_pass = None  # PassContext.on_pass: progress of each pass
        self.seq = seq
        self.int_dtype = int_dtype
        self.work_dir = work_dir
        # numpy has no bfloat16: bf16 graphs are exported layer by layer.
        self.weight_swap = weight_swap and parts.dtype in (torch.float32, torch.float16)
        self._templates: dict[tuple, _Template] = {}
        # Per segment: how many traces its build took, and whether its weights were swapped in. Each segment
        # is built by one caller, so these are never written twice for a key (the factory takes no locks:
        # the scheduler owns threads and the order templates are made and used in).
        self._traces: dict[str, int] = {}
        self._swapped: set[str] = set()

    @property
    def traced(self) -> int:
        """Traces made so far (a template's probe trace included)."""
        return sum(self._traces.values())

    @property
    def swapped(self) -> int:
        """Segments whose weights were swapped into another layer's optimised graph."""
        return len(self._swapped)

    # -- the public step -------------------------------------------------------------------------
    def build(self, spec: SegmentSpec) -> BuiltSegment:
        if not (self.weight_swap and spec.kind in LAYER_KINDS):
            return self._full(spec)
        key = self.layer_key(spec)
        known = self._templates.get(key)
        if known is None:
            model, weights, shared_results = self._trace_shared(self.parts, spec)
            self._templates[key] = self._make_template(spec, model, weights, shared_results)
            model, weights, own_results = self._run_chain(model, weights, spec, self._per_layer_chain,
                                                          before=self._shared_chain)
            return BuiltSegment(spec, model, shared_results + own_results, weights=weights)
        if known.template is None:
            return self._full(spec)
        model, weights = weight_swap.apply(known.template, known.template.fill(self._layer_arrays(self.parts, spec)))
        self._swapped.add(spec.name)
        model, weights, own_results = self._run_chain(model, weights, spec, self._per_layer_chain,
                                                      before=self._shared_chain)
        return BuiltSegment(spec, model, known.results + own_results, swapped_from=known.source_segment,
                            weights=weights)

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def _split(self) -> int:
        """The chain up to the first layer-dependent pass is shared by a template; the rest runs per layer."""
        return next((i for i, p in enumerate(self.chain) if getattr(p, "layer_dependent", False)), len(self.chain))

    @property
    def _shared_chain(self) -> list:
        return self.chain[: self._split]

    @property
    def _per_layer_chain(self) -> list:
        return self.chain[self._split:]

    def _run_chain(self, model, weights: list, spec: SegmentSpec, chain: list, before: list | None = None):
        """Run ``chain`` on a graph whose big weights are set aside in ``weights``; returns the same form."""
        if not chain:
            return model, weights, []
        from ..passes import PassContext, run_chain

        on_pass = None
        if self.on_pass is not None:  # positions in the whole chain, of which ``chain`` is a part
            offset, total, report = len(before or []), len(self.chain), self.on_pass
            on_pass = lambda segment, name, index, _n: report(segment, name, offset + index, total)  # noqa: E731
        ctx = PassContext(segment=spec.name, shapes=spec.shapes(), work_dir=self.work_dir, layer=spec.layer,
                          kind=spec.kind.value, opaque_inputs=frozenset(t.name for t in weights), on_pass=on_pass)
        model, results = run_chain(model, chain, ctx, ran_before=[p.name for p in before or []])
        return model, weights, results

    def _trace_shared(self, parts: ModelParts, spec: SegmentSpec):
        # Parameters are traced as graph inputs: the exporter never holds a weight as a constant (its
        # shape inference over a 7B layer's constants alone took 40 s and gigabytes).
        exported = export_segment(parts, spec, self.seq, self.int_dtype, self.work_dir, set_aside_bytes=HIDE_MIN_BYTES)
        model, weights = exported.model, exported.weights
        weights += hide_weights(model)  # big constants that are not parameters (long rotary tables)
        self._traces[spec.name] = self._traces.get(spec.name, 0) + 1
        return self._run_chain(model, weights, spec, self._shared_chain)

    def _full(self, spec: SegmentSpec) -> BuiltSegment:
        model, weights, results = self._trace_shared(self.parts, spec)
        model, weights, more = self._run_chain(model, weights, spec, self._per_layer_chain, before=self._shared_chain)
        return BuiltSegment(spec, model, results + more, weights=weights)

    def _layer_prefix(self, spec: SegmentSpec) -> str:
        return f"{self.parts.family.layers_path}.{spec.layer}."

    def _layer_arrays(self, parts: ModelParts, spec: SegmentSpec) -> "LayerArrays":
        """The layer's parameters as the graph holds them (export dtype), by name inside the layer; each is
        read from the memory-mapped checkpoint when asked for."""
        return LayerArrays(parts, self._layer_prefix(spec))

    def layer_key(self, spec: SegmentSpec) -> tuple:
        parts = self.parts
        layer_module = parts.skeleton.get_submodule(f"{parts.family.layers_path}.{spec.layer}")
        return (spec.kind, module_signature(layer_module), id(parts.rotary_table(self.seq, spec.layer)),
                parts.sliding_window(spec.layer))

    def _make_template(self, spec: SegmentSpec, real_model, real_weights: list, real_results: list) -> _Template:
        """Trace the layer again from probe weights, learn where each parameter sits in the optimised graph
        (after the shared part of the chain), and keep that as the template only if it reproduces the
        real-weight graph of this layer exactly."""
        probe_parts = self.parts.with_weights(ProbeWeights(self.parts.weights))  # this template's own probe
        try:
            probe_model, probe_weights, _ = self._trace_shared(probe_parts, spec)
            sources = weight_swap.discover_sources(probe_model, self._layer_arrays(probe_parts, spec),
                                                   probe_weights)
            template = weight_swap.make_template(probe_model, sources, probe_weights)
            del probe_model, probe_weights
            real_weights = list(real_weights)
            if not weight_swap.reproduces(template, template.fill(self._layer_arrays(self.parts, spec)),
                                          real_model, real_weights):
                raise ValueError("the template filled with this layer's weights differs from its own export")
        except ValueError as exc:
            log.info("%s: weight swapping off for layers like this one (%s); each is exported on its own",
                     spec.name, exc)
            return _Template(None, real_results, spec.name)
        finally:
            probe_parts.weights.clear()
        log.info("%s: optimised graph reused for the other layers of this structure", spec.name)
        return _Template(template, real_results, spec.name)
