"""One segment spec -> its traced ONNX graph (``ExportedSegment``), one module's weights in memory at a time."""

from __future__ import annotations

import logging
import tempfile
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..contract.segments import MASK_VALUE, SegmentKind, SegmentSpec
from ..errors import ModelError, UsageError
from ..source.families import KV_SHARING_NONE
from .family_layers import adapt_layer
from .graph_surgery import params_to_weights, restore_unused_inputs, unused_graph_inputs  # noqa: F401
from .model_parts import TORCH_DTYPES, ModelParts, _parameters_on_meta  # noqa: F401 - re-exported
from .notes import export_notes, unused_inputs_note  # noqa: F401 - re-exported
from .per_layer_inputs import ExtraInputsBlockCacheSegment, ExtraInputsBlockSegment, PerLayerEmbeddingSegment
from .wrappers import (
    BlockCacheSegment,
    BlockKvSegment,
    BlockSegment,
    EmbeddingSegment,
    FloatBoundary,
    GreedyHeadSegment,
    LmHeadSegment,
    LoraInputs,
    PenaltySampleHeadSegment,
    SampleHeadSegment,
)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 15
NP_TO_TORCH_INT = {"int32": torch.int32, "int64": torch.int64}


def _example_inputs(spec: SegmentSpec, seq: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the spec's shapes whose values are valid for the segment (ids in range, causal mask)."""
    tensors = []
    for t in spec.inputs:
        if t.dtype.startswith("int"):
            dtype = NP_TO_TORCH_INT[t.dtype]
            if t.name == "position_ids":  # each row 0, 1, ... (mrope's three rows; a vit patch's (h, w))
                x = torch.arange(t.shape[-1], dtype=dtype).expand(t.shape).contiguous()
            else:
                x = torch.ones(t.shape, dtype=dtype)
        elif t.name == "attention_mask":
            x = torch.zeros(t.shape, dtype=torch.float32)
            if t.shape[-1] == t.shape[-2]:
                x = torch.triu(torch.full(t.shape, MASK_VALUE), diagonal=1)
        elif t.name == "top_k":
            x = torch.full(t.shape, SAMPLING_EXAMPLES["top_k"], dtype=NP_TO_TORCH_INT[t.dtype])
        elif t.name in SAMPLING_EXAMPLES:
            x = torch.full(t.shape, SAMPLING_EXAMPLES[t.name], dtype=torch.float32)
        else:
            x = torch.randn(t.shape, dtype=torch.float32)
        tensors.append(x)
    return tuple(tensors)


SAMPLING_EXAMPLES = {"top_p": 0.8, "temperature": 0.7, "penalty": 1.1, "top_k": 40}


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
    if spec.kind == SegmentKind.SAMPLE_HEAD:
        yield SampleHeadSegment(top_k=spec.outputs[0].shape[-1], int_dtype=torch_int)
        return
    if parts is None:
        raise ModelError(f"segment '{spec.name}' needs the model's weights")
    fam = parts.family
    if spec.kind == SegmentKind.VIT:  # export/vision.py: the vision tower with host-made window bookkeeping
        from .vision import vit_segment

        projector_path = fam.vision.projector_path  # Gemma 3: the multimodal projector, outside the tower
        projected = parts.materialized(projector_path, placeholders_from) if projector_path else nullcontext()
        with parts.materialized(fam.vision.path, placeholders_from) as visual, projected as projector:
            yield _with_float_boundary(vit_segment(fam.vision.kind, visual, spec.inputs[0].shape[0], projector), parts)
        return
    if spec.kind in (SegmentKind.EMBEDDING, SegmentKind.EMBEDDING_CACHE) and spec.per_layer:
        # Per-layer embeddings (Gemma 4): the second table is gathered by the same segment.
        ple = fam.per_layer_embedding
        with parts.materialized(fam.embed_path, placeholders_from) as embed, \
                parts.materialized(ple.table_path, placeholders_from) as table:
            shape = spec.outputs[1].shape
            yield _with_float_boundary(
                PerLayerEmbeddingSegment(embed, table, parts.embed_scale(embed), shape[2], shape[3]), parts)
    elif spec.kind in (SegmentKind.EMBEDDING, SegmentKind.EMBEDDING_CACHE):
        with parts.materialized(fam.embed_path, placeholders_from) as embed:
            yield _with_float_boundary(EmbeddingSegment(embed, parts.embed_scale(embed)), parts)
    elif spec.kind in (SegmentKind.BLOCK, SegmentKind.BLOCK_KV, SegmentKind.BLOCK_CACHE):
        rotary = parts.rotary_table(seq, spec.layer)
        window = parts.sliding_window(spec.layer)
        if window is not None and seq <= window:
            window = None  # positions never differ by >= window: plain causal attention is exact
        with parts.materialized(f"{fam.layers_path}.{spec.layer}", placeholders_from) as layer:
            adapt_layer(fam.layer_rewrites, layer, parts.text_config)  # family_layers: static-shape rewrites
            if spec.layer in fam.state_layers(parts.text_config):  # a state instead of a KV cache
                from .linear_attention import StateBlockCacheSegment, StateBlockSegment
                from .wrappers import _layer_cache_kwarg

                cls = StateBlockSegment if spec.kind == SegmentKind.BLOCK else StateBlockCacheSegment
                yield _with_float_boundary(cls(layer, _layer_cache_kwarg(layer),
                                               tuple(fam.state_shapes(parts.text_config))), parts)
                return
            if fam.per_layer_embedding is not None or fam.kv_sharing != KV_SHARING_NONE:
                # per_layer_inputs: Gemma 4's extra block inputs (its layers take the shared-KV store either way)
                cls = ExtraInputsBlockSegment if spec.kind == SegmentKind.BLOCK else ExtraInputsBlockCacheSegment
                yield _with_float_boundary(cls(layer, rotary, window, fam, parts.skeleton,
                                               fam.layer_type(parts.text_config, spec.layer),
                                               spec.per_layer, spec.shared_kv), parts)
            elif parts.num_device > 1:  # the form tpu-mlir's device-parallel pass splits (tensor_parallel_block)
                yield _with_float_boundary(_tensor_parallel_block(layer, rotary, window, spec, fam.name), parts)
            else:
                cls = {SegmentKind.BLOCK: BlockSegment, SegmentKind.BLOCK_KV: BlockKvSegment,
                       SegmentKind.BLOCK_CACHE: BlockCacheSegment}[spec.kind]
                block = cls(layer, rotary, window)
                if spec.lora_linears:  # --lora-max-rank: each linear's A and B follow the block's own inputs
                    block = LoraInputs(block, layer, spec.lora_linears, len(spec.inputs) - 2 * len(spec.lora_linears))
                yield _with_float_boundary(block, parts)
    elif spec.kind == SegmentKind.LM_HEAD:
        greedy, token_only = spec.greedy_token, spec.greedy_token and not spec.logits
        with parts.materialized(fam.norm_path, placeholders_from) as norm, \
                parts.materialized(fam.lm_head_path, placeholders_from) as head:
            yield _with_float_boundary(
                LmHeadSegment(norm, head, parts.final_softcap(), parts.logits_scale(), greedy, torch_int,
                              token_only), parts)
    else:
        raise ModelError(f"segment kind '{spec.kind.value}' is not implemented by the exporter")


def _tensor_parallel_block(layer: nn.Module, rotary, window: int | None, spec: SegmentSpec, family: str) -> nn.Module:
    from .tensor_parallel_block import (TensorParallelBlockCacheSegment, TensorParallelBlockSegment,
                                        unsupported_reason)

    reason = unsupported_reason(layer)
    if reason is None and window is not None:
        reason = "its layers use a sliding window shorter than SEQ"
    if reason is None and spec.kind not in (SegmentKind.BLOCK, SegmentKind.BLOCK_CACHE):
        reason = f"segment kind '{spec.kind.value}' has no tensor-parallel form"
    if reason:
        raise UsageError(f"cannot write {family}'s blocks for tpu-mlir's device-parallel split: {reason}",
                         option="num_device")
    cls = TensorParallelBlockSegment if spec.kind == SegmentKind.BLOCK else TensorParallelBlockCacheSegment
    return cls(layer, rotary)


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


@dataclass
class ExportedSegment:
    """A traced segment graph. ``weights``: the big parameters set aside as graph inputs (LazyWeights, the
    form ``factory.hide_weights`` produces); empty unless ``set_aside_bytes`` was given."""

    model: Any  # onnx.ModelProto
    weights: list = field(default_factory=list)


def export_segment(parts: ModelParts | None, spec: SegmentSpec, seq: int, int_dtype: str,
                   work_dir: Path | None = None, opset: int = DEFAULT_OPSET,
                   set_aside_bytes: int | None = None) -> ExportedSegment:
    """Trace one segment with the TorchScript ONNX exporter (static shapes, opset <= 17).

    With ``set_aside_bytes`` the parameters are traced as graph inputs named after them (the tracer never
    holds them as constants, which is what makes a 150k-vocabulary embedding slow to export):
    parameters smaller than ``set_aside_bytes`` become initializers again, the bigger ones stay graph
    inputs and are returned in ``weights`` (see ``graph_surgery.params_to_weights``).
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
            weights = params_to_weights(model, {k: p.detach() for k, p in params.items()}, set_aside_bytes, parts)
    restored = restore_unused_inputs(model, spec)
    if restored:
        log.info("%s does not read %s; still declared as graph input(s) for the contract", spec.name, ", ".join(restored))
    return ExportedSegment(model, weights)


