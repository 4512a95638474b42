"""Initializers of a group of segments -> one external-data file, each distinct tensor stored once.

block_i and block_cache_i hold the same weights; a tied embedding and lm_head hold the same matrix.
Writing a group through one WeightsFile keeps a single copy on disk, and the ONNX files stay small.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import numpy_helper

ALIGN = 64  # byte alignment of each tensor in the file


def _raw_bytes(t: onnx.TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


class WeightsFile:
    """Appends tensors to ``stage_dir/name`` (renamed into OUT by the caller) and points initializers at it."""

    def __init__(self, stage_dir: Path, name: str, min_bytes: int = 1024):
        self.name = name
        self.path = Path(stage_dir) / name
        self.min_bytes = min_bytes
        self._fh = open(self.path, "wb")
        self._offsets: dict[str, tuple[int, int]] = {}
        self.tensors_written = 0
        self.tensors_shared = 0

    def externalize(self, model: onnx.ModelProto) -> None:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            data = _raw_bytes(t)
            if len(data) < self.min_bytes:
                continue
            key = hashlib.sha256(data).hexdigest() + str(t.data_type)
            if key in self._offsets:
                offset, length = self._offsets[key]
                self.tensors_shared += 1
            else:
                pos = self._fh.tell()
                pad = (-pos) % ALIGN
                if pad:
                    self._fh.write(b"\0" * pad)
                offset, length = pos + pad, len(data)
                self._fh.write(data)
                self._offsets[key] = (offset, length)
                self.tensors_written += 1
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", self.name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v

    @property
    def empty(self) -> bool:
        return not self._offsets

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
