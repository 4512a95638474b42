"""Model folder + segment specs -> one ONNX ModelProto per segment, one layer's weights in memory at a time."""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..contract import MASK_VALUE, SegmentKind, SegmentSpec
from ..errors import ModelError
from ..families import FamilySpec
from ..model_source import WeightStore
from .wrappers import (
    BlockCacheSegment,
    BlockSegment,
    EmbeddingSegment,
    GreedyHeadSegment,
    LmHeadSegment,
    RotaryTable,
)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 15
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NP_TO_TORCH_INT = {"int32": torch.int32, "int64": torch.int64}


class ModelParts:
    """Materialises a model's modules one at a time: the skeleton lives on the meta device (no memory),
    and each module gets its weights from the memory-mapped safetensors only while it is exported."""

    def __init__(self, config, family: FamilySpec, weights: WeightStore, dtype: str = "float32"):
        from transformers import AutoModelForCausalLM

        self.config = config
        self.family = family
        self.weights = weights
        self.dtype = TORCH_DTYPES[dtype]
        config._attn_implementation = "eager"
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
            except TypeError:
                self.skeleton = AutoModelForCausalLM.from_config(config)
        self.skeleton.eval()
        self.text_config = config.get_text_config() if hasattr(config, "get_text_config") else config

    def _submodule(self, path: str) -> nn.Module:
        try:
            return self.skeleton.get_submodule(path)
        except AttributeError:
            raise ModelError(f"{type(self.skeleton).__name__} has no module '{path}' (family {self.family.name})") from None

    def _checkpoint_key(self, module_path: str, param: str) -> str:
        key = f"{module_path}.{param}"
        if key in self.weights:
            return key
        if module_path == self.family.lm_head_path and self.tied:
            return f"{self.family.embed_path}.{param}"
        raise ModelError(f"weight '{key}' is missing from the model's safetensors")

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False)) or (
            f"{self.family.lm_head_path}.weight" not in self.weights
        )

    @contextmanager
    def materialized(self, path: str) -> Iterator[nn.Module]:
        """A real (CPU) copy of the module at ``path`` with its weights; freed on exit."""
        meta = self._submodule(path)
        module = copy.deepcopy(meta).to_empty(device="cpu")
        state = {}
        for name, _ in list(meta.named_parameters()) + list(meta.named_buffers()):
            if name in dict(meta.named_buffers()) and name not in meta.state_dict():
                continue  # non-persistent buffer: not in checkpoints
            state[name] = self.weights.get(self._checkpoint_key(path, name)).to(self.dtype)
        module.load_state_dict(state, strict=False, assign=True)
        module.eval()
        try:
            yield module
        finally:
            del module, state

    def rotary_table(self, seq: int, layer: int | None = None) -> RotaryTable:
        meta = self._submodule(self.family.rotary_path)
        rotary = type(meta)(config=meta.config if hasattr(meta, "config") else self.text_config)
        return RotaryTable.from_hf(rotary, seq)

    def embed_scale(self) -> float | None:
        return float(self.text_config.hidden_size) ** 0.5 if self.family.scale_embedding_by_sqrt_hidden else None

    def final_softcap(self) -> float | None:
        attr = self.family.final_softcap_attr
        return getattr(self.text_config, attr, None) if attr else None


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
        else:
            x = torch.randn(t.shape, dtype=torch.float32)
        tensors.append(x)
    return tuple(tensors)


@contextmanager
def segment_module(parts: ModelParts, spec: SegmentSpec, seq: int, int_dtype: str) -> Iterator[nn.Module]:
    """The torch module of one segment, its weights in memory only inside the context."""
    fam = parts.family
    if spec.kind in (SegmentKind.EMBEDDING, SegmentKind.EMBEDDING_CACHE):
        with parts.materialized(fam.embed_path) as embed:
            yield EmbeddingSegment(embed, parts.embed_scale())
    elif spec.kind in (SegmentKind.BLOCK, SegmentKind.BLOCK_CACHE):
        rotary = parts.rotary_table(seq, spec.layer)
        with parts.materialized(f"{fam.layers_path}.{spec.layer}") as layer:
            cls = BlockSegment if spec.kind == SegmentKind.BLOCK else BlockCacheSegment
            yield cls(layer, rotary)
    elif spec.kind == SegmentKind.LM_HEAD:
        with parts.materialized(fam.norm_path) as norm, parts.materialized(fam.lm_head_path) as head:
            yield LmHeadSegment(norm, head, parts.final_softcap())
    elif spec.kind == SegmentKind.GREEDY_HEAD:
        yield GreedyHeadSegment(NP_TO_TORCH_INT[int_dtype])
    else:
        raise ModelError(f"segment kind '{spec.kind.value}' is not implemented by the exporter")


def export_segment(parts: ModelParts, spec: SegmentSpec, seq: int, int_dtype: str,
                   work_dir: Path | None = None, opset: int = DEFAULT_OPSET):
    """Trace one segment with the TorchScript ONNX exporter (static shapes, opset <= 17) -> ModelProto."""
    import onnx

    inputs = _example_inputs(spec, seq)
    with segment_module(parts, spec, seq, int_dtype) as module, tempfile.TemporaryDirectory(
        dir=work_dir, prefix=f"{spec.name}-"
    ) as tmp:
        path = Path(tmp) / f"{spec.name}.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                inputs,
                str(path),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(str(path), load_external_data=True)
    return model
