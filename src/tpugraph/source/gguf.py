"""A .gguf file -> the model's Hugging Face parameters, each dequantized to float32 when it is read.

The file is memory-mapped by the ``gguf`` package's reader; a tensor's blocks are read and dequantized
only when that parameter is asked for. Names and values follow transformers' own GGUF loader exactly:
its GGUF -> HF name map (``get_gguf_hf_weights_map`` over the model's parameters) and its per-architecture
tensor processor (which undoes llama.cpp's q/k row permutation, Gemma's norm offset), applied per tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .weights import meta_model

log = logging.getLogger(__name__)

# ggml tensor types this reader dequantizes (gguf.quants.dequantize); anything else is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def open_reader(path: Path):
    """The gguf package's memory-mapped reader, or one clear line for a file it cannot read."""
    try:
        import gguf
    except ImportError:
        raise ModelError("reading a .gguf file needs the 'gguf' package (pip install gguf)") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # truncated files raise ValueError, IndexError, struct errors...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"'{path}' is not a readable GGUF file (truncated or corrupt?): {first}") from None


@dataclass(frozen=True)
class _TensorPlace:
    """Where a tensor's bytes sit in the file, and how the reader saw them (no map kept open)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: innermost dim first
    offset: int
    data_dtype: Any  # numpy dtype of the reader's view (uint8 blocks, or the float type)
    data_shape: tuple[int, ...]


class GgufWeights:
    """A WeightStore look-alike over a .gguf file: HF parameter names, float32 tensors read on demand."""

    def __init__(self, path: Path, config):
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.path = Path(path)
        reader = open_reader(self.path)
        architecture = read_field(reader, "general.architecture")[0]
        # The same config dict transformers hands its tensor processor (metadata only, no tensors).
        parsed_config = load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed_config)
        if type(self._processor).process is not TensorProcessor.process and architecture not in (
                "llama", "gemma2", "gemma3"):
            raise ModelError(f"GGUF architecture '{architecture}' needs a tensor conversion tpugraph does not "
                             "stream (mixture-of-experts or fused tensors)")
        to_hf = get_gguf_hf_weights_map(meta_model(config), self._processor)
        self._tensors: dict[str, _TensorPlace] = {}  # HF name -> where its bytes are
        self.tensor_types: dict[str, str] = {}  # HF name -> ggml type name
        unsupported = []
        for tensor in reader.tensors:
            hf_name = to_hf.get(tensor.name)
            if hf_name is None:
                log.info("GGUF tensor %s has no parameter in the model; ignored (as transformers does)", tensor.name)
                continue
            type_name = tensor.tensor_type.name
            if type_name not in SUPPORTED_TYPES:
                unsupported.append(f"{tensor.name} ({type_name})")
            self._tensors[hf_name] = _TensorPlace(tensor.name, tensor.tensor_type, tuple(int(d) for d in tensor.shape),
                                                  int(tensor.data_offset), tensor.data.dtype,
                                                  tuple(tensor.data.shape))
            self.tensor_types[hf_name] = type_name
        if unsupported:
            more = f" and {len(unsupported) - 1} more" if len(unsupported) > 1 else ""
            raise ModelError(f"'{self.path.name}': tensor {unsupported[0]}{more} has a GGUF type tpugraph does not "
                             f"dequantize (supported: {', '.join(SUPPORTED_TYPES)})")
        self._architecture = architecture
        del reader  # its map of the whole file would keep every page ever read resident

    def _read(self, place: _TensorPlace):
        """The tensor's bytes through a fresh map of just that region (released after the read, like
        WeightStore's per-read safetensors maps)."""
        import math

        import numpy as np

        count = math.prod(place.data_shape)
        return np.memmap(self.path, dtype=place.data_dtype, mode="r", offset=place.offset,
                         shape=(count,)).reshape(place.data_shape)

    @property
    def quantization(self) -> dict[str, Any]:
        """What the manifest records about the source's quantization."""
        counts: dict[str, int] = {}
        for t in self.tensor_types.values():
            counts[t] = counts.get(t, 0) + 1
        return {"method": "gguf", "file": self.path.name, "architecture": self._architecture,
                "type_counts": dict(sorted(counts.items())), "tensor_types": dict(self.tensor_types)}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape_and_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        """The parameter's shape (GGUF stores dims innermost first) and 'F32', the dtype it is read in."""
        tensor = self._require(key)
        return tuple(int(d) for d in reversed(list(tensor.shape))), "F32"

    def gguf_name(self, key: str) -> str:
        """The tensor's name in the file (e.g. blk.0.attn_q.weight)."""
        return self._require(key).name

    def ggml_type(self, key: str) -> str:
        self._require(key)
        return self.tensor_types[key]

    def _require(self, key: str):
        tensor = self._tensors.get(key)
        if tensor is None:
            raise ModelError(f"weight '{key}' is missing from '{self.path.name}'")
        return tensor

    def get(self, key: str):
        import numpy as np
        import torch
        from gguf import dequantize

        tensor = self._require(key)
        try:
            values = dequantize(self._read(tensor), tensor.tensor_type)
        except Exception as exc:  # a truncated map reads short
            raise ModelError(f"cannot read GGUF tensor '{tensor.name}' from '{self.path.name}': {exc}") from None
        result = self._processor.process(weights=values, name=tensor.name, tensor_key_mapping={},
                                         parsed_parameters={"tensors": {}})
        shape = self.shape_and_dtype(key)[0]
        # A copy: F32/F16 tensors come back as views of the memory map, which must not outlive the read.
        return torch.from_numpy(np.array(result.weights, dtype=np.float32).reshape(shape))
