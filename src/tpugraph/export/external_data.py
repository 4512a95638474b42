"""Initializers of a group of segments -> one external-data file, each distinct tensor stored once.

block_i and block_cache_i hold the same weights; a tied embedding and lm_head hold the same matrix.
Writing a group through one WeightsFile keeps a single copy on disk, and the ONNX files stay small.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx

from ..passes._graph import tensor_bytes

ALIGN = 64  # byte alignment of each tensor in the file



class WeightsFile:
    """Appends tensors to ``stage_dir/name`` (renamed into OUT by the caller) and points initializers at it."""

    def __init__(self, stage_dir: Path, name: str, min_bytes: int = 1024):
        self.name = name
        self.path = Path(stage_dir) / name
        self.min_bytes = min_bytes
        self._fh = open(self.path, "wb")
        self._offsets: dict[str, tuple[int, int]] = {}

    def _store(self, data: bytes, data_type: int) -> tuple[int, int]:
        key = hashlib.sha256(data).hexdigest() + str(data_type)
        if key in self._offsets:
            return self._offsets[key]
        pos = self._fh.tell()
        pad = (-pos) % ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
        self._fh.write(data)
        self._offsets[key] = (pos + pad, len(data))
        return self._offsets[key]

    @staticmethod
    def _point(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            t.ClearField(field)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v

    def externalize(self, model: onnx.ModelProto, set_aside: list[onnx.TensorProto] = ()) -> None:
        """Move the model's initializers (of at least ``min_bytes``) into the file, and attach the weights
        ``set_aside`` from the graph (declared as graph inputs) as external initializers again."""
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            data = tensor_bytes(t)
            if len(data) < self.min_bytes:
                continue
            self._point(t, self.name, *self._store(data, t.data_type))
        if not set_aside:
            return
        hidden = {t.name for t in set_aside}
        inputs = [v for v in model.graph.input if v.name not in hidden]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        read = {name for node in model.graph.node for name in node.input}
        for w in set_aside:
            if w.name not in read:
                continue
            offset, length = self._store(tensor_bytes(w), w.data_type)
            stub = model.graph.initializer.add()
            stub.name, stub.data_type = w.name, w.data_type
            stub.dims.extend(w.dims)
            self._point(stub, self.name, offset, length)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
