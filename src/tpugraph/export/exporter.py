"""Model folder + segment specs -> one ONNX ModelProto per segment, one layer's weights in memory at a time."""

from __future__ import annotations

import copy
import inspect
import logging
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from ..contract import MASK_VALUE, SegmentKind, SegmentSpec
from ..errors import ModelError
from ..families import FamilySpec
from ..model_source import WeightStore
from .wrappers import (
    BlockCacheSegment,
    BlockSegment,
    EmbeddingSegment,
    FloatBoundary,
    GreedyHeadSegment,
    LmHeadSegment,
    PenaltySampleHeadSegment,
    RotaryTable,
)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 15
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NP_TO_TORCH_INT = {"int32": torch.int32, "int64": torch.int64}


class _BigTensorsOnMeta(TorchFunctionMode):
    """While active (in the calling thread only: torch function modes are thread-local), tensors that
    factory functions create with at least ``min_bytes`` are made on the meta device.

    Building a model under it puts its weights on meta (no memory) while the small tensors a constructor
    computes (rotary inv_freq, Gemma's embed_scale: buffers checkpoints usually lack) keep real values.
    """

    def __init__(self, min_bytes: int):
        super().__init__()
        self.min_bytes = min_bytes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            made = func(*args, **{**kwargs, "device": "meta"})
            if made.numel() * made.element_size() >= self.min_bytes:
                return made
        return func(*args, **kwargs)


META_MIN_BYTES = 4096  # tensors this big are made on meta when the skeleton is built


def _build_skeleton(config) -> nn.Module:
    """The model with its big tensors on meta. A buffer that came out on meta (a constructor computed a
    big one) is built again with a threshold above it, so every buffer is real."""
    from transformers import AutoModelForCausalLM

    min_bytes = META_MIN_BYTES
    for _ in range(4):
        with _BigTensorsOnMeta(min_bytes):
            # Built in float32 whatever the checkpoint's dtype: buffers (rope, embed scale) then equal
            # those of the float32 reference model verify compares with.
            try:
                skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
            except TypeError:
                skeleton = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        meta_buffers = [b.numel() * b.element_size() for b in skeleton.buffers() if b.device.type == "meta"]
        if not meta_buffers:
            break
        min_bytes = 2 * max(meta_buffers) + 1
    else:
        raise ModelError("cannot build the model's skeleton: some of its buffers stay on the meta device")
    for module in skeleton.modules():  # parameters on meta, whatever their size (as checkpoints give them)
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                setattr(module, name, nn.Parameter(param.to("meta"), requires_grad=param.requires_grad))
    return skeleton


class ModelParts:
    """Materialises a model's modules one at a time: the skeleton's parameters live on the meta device
    (no memory), and each module gets its weights from the memory-mapped safetensors only while it is
    exported."""

    def __init__(self, config, family: FamilySpec, weights: WeightStore, dtype: str = "float32"):
        import transformers

        family.check_transformers(transformers.__version__)
        config = copy.deepcopy(config)  # from_config writes dtype and attention choices into it
        self.config = config
        self.family = family
        self.weights = weights
        self.dtype_name = dtype
        self.dtype = TORCH_DTYPES[dtype]
        config._attn_implementation = "eager"
        self.skeleton = _build_skeleton(config)
        self.skeleton.eval()
        self._init_views()

    def _init_views(self) -> None:
        self.text_config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        self._rotary_tables: dict[tuple, RotaryTable] = {}
        # data_ptr of a placeholder parameter -> the checkpoint key its values are read from when written
        self._placeholders: dict[int, str] = {}

    def with_weights(self, weights) -> "ModelParts":
        """The same model (its skeleton is shared, read only) whose weights come from ``weights``."""
        other = copy.copy(self)
        other.weights = weights
        other._init_views()
        return other

    def _submodule(self, path: str) -> nn.Module:
        try:
            return self.skeleton.get_submodule(path)
        except AttributeError:
            raise ModelError(f"{type(self.skeleton).__name__} has no module '{path}' (family {self.family.name})") from None

    def _has_module(self, path: str) -> bool:
        try:
            self.skeleton.get_submodule(path)
            return True
        except AttributeError:
            return False

    def checkpoint_key(self, module_path: str, param: str) -> str:
        key = f"{module_path}.{param}"
        if key in self.weights:
            return key
        if module_path == self.family.lm_head_path and self.tied:
            tied = f"{self.family.embed_path}.{param}"
            if tied in self.weights:
                return tied
        raise ModelError(f"weight '{key}' is missing from the model's safetensors")

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False)) or (
            f"{self.family.lm_head_path}.weight" not in self.weights
        )

    @contextmanager
    def materialized(self, path: str, placeholders_from: int | None = None) -> Iterator[nn.Module]:
        """A real (CPU) copy of the module at ``path`` with its weights; freed on exit.

        With ``placeholders_from``, parameters of at least that many bytes are *placeholders*: allocated,
        never read from the checkpoint (pages never touched cost no memory). Tracing needs only their
        shapes; ``placeholder_key`` tells which checkpoint tensor to read when the weight is written."""
        meta = self._submodule(path)
        module = copy.deepcopy(meta)  # parameters on meta (free), buffers real (small)
        persistent = set(meta.state_dict().keys())
        state, placeholders = {}, []
        for name, param in meta.named_parameters():
            key = self.checkpoint_key(path, name)
            if placeholders_from is not None and param.is_floating_point() \
                    and param.numel() * self.dtype.itemsize >= placeholders_from:
                state[name] = torch.empty(param.shape, dtype=self.dtype)
                placeholders.append(state[name].data_ptr())
                self._placeholders[placeholders[-1]] = key
            else:
                state[name] = self.weights.get(key).to(self.dtype)
        for name, buf in meta.named_buffers():
            key = f"{path}.{name}"
            if name in persistent and key in self.weights:
                state[name] = self.weights.get(key).to(buf.dtype)
        module.load_state_dict(state, strict=False, assign=True)
        module.eval()
        try:
            yield module
        finally:
            for ptr in placeholders:
                self._placeholders.pop(ptr, None)
            del module, state

    def placeholder_key(self, tensor: torch.Tensor) -> str | None:
        """The checkpoint key of a placeholder parameter (inside its ``materialized`` context), else None."""
        return self._placeholders.get(tensor.data_ptr())

    def rotary_table(self, seq: int, layer: int) -> RotaryTable:
        """cos/sin of ``layer`` for positions 0..SEQ-1, from the model's own rotary module."""
        fam = self.family
        path, kwargs = fam.rotary_path, fam.rotary_call_kwargs(self.text_config, layer)
        if kwargs and not (self._has_module(path) and _accepts(self._submodule(path).forward, *kwargs)):
            # Older transformers: one rotary module per layer type rather than one taking the type.
            path, kwargs = fam.rotary_module_path(self.text_config, layer), {}
        key = (seq, path, tuple(sorted(kwargs.items())))
        if key not in self._rotary_tables:
            self._rotary_tables[key] = RotaryTable.from_hf(self._submodule(path), seq, self.dtype, **kwargs)
        return self._rotary_tables[key]

    def sliding_window(self, layer: int) -> int | None:
        return self.family.sliding_window(self.text_config, layer)

    def embed_scale(self, embed: nn.Module) -> float | None:
        # transformers 5.x Gemma scales inside its embedding module; 4.x did it in the model forward.
        if hasattr(embed, "embed_scale"):
            return None
        return self.family.embedding_scale(self.text_config)

    def final_softcap(self) -> float | None:
        return self.family.final_softcap(self.text_config)

    def logits_scale(self) -> float | None:
        return self.family.logits_scale(self.text_config)


def unused_inputs_note(unused: dict[str, list[str]]) -> str:
    """The note for segments whose graph ignores some contract inputs (segment name -> input names)."""
    listed = "; ".join(f"{name}: {', '.join(ins)}" for name, ins in unused.items())
    return (f"inputs the graph does not read, still declared so the runtime can feed by position ({listed}); e.g. "
            "position_ids of a layer without rotary embedding (NoPE). A pass or compiler that drops unused "
            "inputs would shift the runtime's positional feeding")


def _accepts(fn, *names: str) -> bool:
    params = inspect.signature(fn).parameters
    return all(n in params for n in names) or any(p.kind == p.VAR_KEYWORD for p in params.values())


def export_notes(family: FamilySpec, config, seq: int, dtype: str = "float32") -> list[str]:
    """Plain-language notes on how faithful an export of this model at SEQ is (stored in the manifest)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    notes: list[str] = []
    layers = int(text_config.num_hidden_layers)
    windows: dict[int, list[int]] = {}
    for i in range(layers):
        w = family.sliding_window(text_config, i)
        if w is not None:
            windows.setdefault(w, []).append(i)
    for w, idx in sorted(windows.items()):
        which = "all layers" if len(idx) == layers else f"layers {_ranges(idx)}"
        if seq <= w:
            notes.append(f"sliding window: {which} attend over a window of {w} tokens; SEQ={seq} <= {w}, so "
                         "full causal attention is the window and those blocks are exact")
        else:
            notes.append(f"sliding window: {which} attend over a window of {w} tokens; SEQ={seq} > {w}, so "
                         "those blocks mask keys >= window positions behind the query themselves (from "
                         "position_ids; history slot c = position c), which is exact as long as the runtime "
                         "keeps the contract's slot-n-holds-position-n history")
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    params = [rope] + [p for p in rope.values() if isinstance(p, dict)] if isinstance(rope, dict) else []
    for p in params:
        rope_type = p.get("rope_type") or p.get("type")
        if rope_type not in ("dynamic", "longrope"):
            continue
        original = (p.get("original_max_position_embeddings")
                    or getattr(text_config, "original_max_position_embeddings", None)
                    or getattr(text_config, "max_position_embeddings", None))
        if original and seq > int(original):
            notes.append(f"rope '{rope_type}' depends on the sequence length: the baked cos/sin table is what "
                         f"transformers computes for {seq} tokens (past original_max_position_embeddings="
                         f"{original}), while transformers itself uses the unscaled rope until a sequence is "
                         f"longer than {original}; shorter conversations differ from transformers")
            break
    if dtype != "float32":
        notes.append(f"weights are {dtype}; segment inputs/outputs stay float32 (cast at the segment "
                     "boundary), and numerics differ from the float32 model by that dtype's rounding")
    return notes


def _ranges(idx: list[int]) -> str:
    if len(idx) > 6:
        return f"{', '.join(map(str, idx[:6]))}, ... ({len(idx)} layers)"
    return ", ".join(map(str, idx))


def _example_inputs(spec: SegmentSpec, seq: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the spec's shapes whose values are valid for the segment (ids in range, causal mask)."""
    tensors = []
    for t in spec.inputs:
        if t.dtype.startswith("int"):
            dtype = NP_TO_TORCH_INT[t.dtype]
            if t.name == "position_ids":
                n = int(np.prod(t.shape))
                x = torch.arange(n, dtype=dtype).reshape(t.shape)
            else:
                x = torch.ones(t.shape, dtype=dtype)
        elif t.name == "attention_mask":
            x = torch.zeros(t.shape, dtype=torch.float32)
            if t.shape[-1] == t.shape[-2]:
                x = torch.triu(torch.full(t.shape, MASK_VALUE), diagonal=1)
        elif t.name in SAMPLING_EXAMPLES:
            x = torch.full(t.shape, SAMPLING_EXAMPLES[t.name], dtype=torch.float32)
        else:
            x = torch.randn(t.shape, dtype=torch.float32)
        tensors.append(x)
    return tuple(tensors)


SAMPLING_EXAMPLES = {"top_p": 0.8, "temperature": 0.7, "penalty": 1.1}


def _with_float_boundary(module: nn.Module, parts: ModelParts) -> nn.Module:
    return module if parts.dtype == torch.float32 else FloatBoundary(module, parts.dtype)


@contextmanager
def segment_module(parts: ModelParts | None, spec: SegmentSpec, seq: int, int_dtype: str,
                   placeholders_from: int | None = None) -> Iterator[nn.Module]:
    """The torch module of one segment, its weights in memory only inside the context (parameters of at
    least ``placeholders_from`` bytes as placeholders: see ``ModelParts.materialized``).

    The sampling heads have no weights: for them ``parts`` may be None.
    """
    torch_int = NP_TO_TORCH_INT[int_dtype]
    if spec.kind == SegmentKind.GREEDY_HEAD:
        yield GreedyHeadSegment(torch_int)
        return
    if spec.kind == SegmentKind.PENALTY_SAMPLE_HEAD:
        yield PenaltySampleHeadSegment(top_k=spec.outputs[0].shape[-1], int_dtype=torch_int)
        return
    if parts is None:
        raise ModelError(f"segment '{spec.name}' needs the model's weights")
    fam = parts.family
    if spec.kind in (SegmentKind.EMBEDDING, SegmentKind.EMBEDDING_CACHE):
        with parts.materialized(fam.embed_path, placeholders_from) as embed:
            yield _with_float_boundary(EmbeddingSegment(embed, parts.embed_scale(embed)), parts)
    elif spec.kind in (SegmentKind.BLOCK, SegmentKind.BLOCK_CACHE):
        rotary = parts.rotary_table(seq, spec.layer)
        window = parts.sliding_window(spec.layer)
        if window is not None and seq <= window:
            window = None  # positions never differ by >= window: plain causal attention is exact
        with parts.materialized(f"{fam.layers_path}.{spec.layer}", placeholders_from) as layer:
            cls = BlockSegment if spec.kind == SegmentKind.BLOCK else BlockCacheSegment
            yield _with_float_boundary(cls(layer, rotary, window), parts)
    elif spec.kind == SegmentKind.LM_HEAD:
        greedy = any(t.name == "token" for t in spec.outputs)
        with parts.materialized(fam.norm_path, placeholders_from) as norm, \
                parts.materialized(fam.lm_head_path, placeholders_from) as head:
            yield _with_float_boundary(
                LmHeadSegment(norm, head, parts.final_softcap(), parts.logits_scale(), greedy, torch_int), parts)
    else:
        raise ModelError(f"segment kind '{spec.kind.value}' is not implemented by the exporter")


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


def _params_to_weights(model, params: dict[str, torch.Tensor], set_aside_bytes: int,
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


# torch.onnx's TorchScript exporter keeps global state (opset, flags) while it runs: one export at a time.
_EXPORT_LOCK = threading.Lock()


class _ParamsAsInputs(nn.Module):
    """Runs ``inner`` with the given parameters replaced by extra forward arguments.

    The tracer then sees each parameter as a graph input of its own name. (``export_params=False`` would
    keep them out of the file too, but the exporter still hands them to its ONNX shape inference, which
    serialises a 150k-vocabulary matrix and takes seconds.) ``inner`` is held outside the module tree so
    its parameters are not traced as the wrapper's own.
    """

    def __init__(self, inner: nn.Module, names: list[str], n_inputs: int):
        super().__init__()
        self._inner = [inner]
        self.names = names
        self.n_inputs = n_inputs

    def forward(self, *args):
        # torch.func.functional_call, minus its refusal to run under the TorchScript tracer: the same
        # reparametrisation of ``inner``, a copy this segment's export owns (``ModelParts.materialized``).
        from torch.nn.utils.stateless import _reparametrize_module

        inputs, params = args[: self.n_inputs], args[self.n_inputs:]
        with _reparametrize_module(self._inner[0], dict(zip(self.names, params))):
            return self._inner[0](*inputs)


def export_segment(parts: ModelParts | None, spec: SegmentSpec, seq: int, int_dtype: str,
                   work_dir: Path | None = None, opset: int = DEFAULT_OPSET, set_aside_bytes: int | None = None):
    """Trace one segment with the TorchScript ONNX exporter (static shapes, opset <= 17) -> ModelProto.

    With ``set_aside_bytes`` the parameters are traced as graph inputs named after them (the tracer never
    holds them as constants, which is what makes a 150k-vocabulary embedding slow to export) and the
    result is ``(model, weights)``: parameters smaller than ``set_aside_bytes`` become initializers again,
    the bigger ones stay graph inputs and are returned as LazyWeights, the form ``factory.hide_weights``
    produces (see ``_params_to_weights``).
    """
    import onnx

    inputs = _example_inputs(spec, seq)
    weights: list = []
    with segment_module(parts, spec, seq, int_dtype, set_aside_bytes) as module, tempfile.TemporaryDirectory(
        dir=work_dir, prefix=f"{spec.name}-"
    ) as tmp:
        path = Path(tmp) / f"{spec.name}.onnx"
        input_names = [t.name for t in spec.inputs]
        params = dict(module.named_parameters()) if set_aside_bytes is not None else {}
        traced, args = module, inputs
        if params:
            traced = _ParamsAsInputs(module, list(params), len(inputs))
            args = inputs + tuple(p.detach() for p in params.values())
        with _EXPORT_LOCK, torch.no_grad():
            torch.onnx.export(
                traced,
                args,
                str(path),
                input_names=input_names + list(params),
                output_names=[t.name for t in spec.outputs],
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(str(path), load_external_data=True)
        if params:
            weights = _params_to_weights(model, {k: p.detach() for k, p in params.items()}, set_aside_bytes, parts)
    restored = _restore_unused_inputs(model, spec)
    if restored:
        log.info("%s does not read %s; still declared as graph input(s) for the contract", spec.name, ", ".join(restored))
    return model if set_aside_bytes is None else (model, weights)


def unused_graph_inputs(model) -> list[str]:
    """Graph inputs no node reads (and no output passes through): what a NoPE layer does to position_ids.

    Read from the final file rather than remembered from tracing, so it stays true for segments whose
    graph was reused or rewritten by passes."""
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    inits = {i.name for i in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits and v.name not in read]


def _restore_unused_inputs(model, spec: SegmentSpec) -> list[str]:
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
