"""Initializers of a group of segments -> one external-data file, each distinct tensor stored once.

block_i and block_cache_i hold the same weights; a tied embedding and lm_head hold the same matrix.
Writing a group through one WeightsFile keeps a single copy on disk, and the ONNX files stay small.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..passes._graph import tensor_bytes

ALIGN = 64  # byte alignment of each tensor in the file
SAMPLE = 1 << 16  # bytes at each end of a tensor that key the duplicate lookup
COMPARE_CHUNK = 1 << 22


class LazyWeight:
    """A weight set aside from a graph (see ``factory.hide_weights``) whose bytes are an array made only
    when the weight is written: no TensorProto copy of a big tensor is ever built on the way to disk.

    Has the ``name``, ``data_type`` and ``dims`` of a TensorProto, which is what the passes look at.
    """

    def __init__(self, name: str, data_type: int, dims, make: Callable[[], np.ndarray], source: tuple | None = None):
        self.name = name
        self.data_type = data_type
        self.dims = list(dims)
        self._make = make
        # What the bytes are made from (checkpoint tensor, transform, dims, type), when known: two weights
        # with the same source hold the same bytes, so a file stores the second without making it.
        self.source = source

    def array(self) -> np.ndarray:
        arr = np.ascontiguousarray(self._make())
        if arr.nbytes != int(np.prod(self.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(
                self.data_type).itemsize:
            raise ValueError(f"weight {self.name}: {arr.nbytes} bytes for dims {self.dims}")
        return arr

    def to_proto(self) -> onnx.TensorProto:
        t = onnx.TensorProto()
        t.name, t.data_type = self.name, self.data_type
        t.dims.extend(self.dims)
        t.raw_data = self.array().tobytes()
        return t


def tensor_array(t, dtype=None, transposed: bool = False) -> np.ndarray:
    """A torch tensor (2-D ``t.T`` if ``transposed``) cast to ``dtype`` as a C-contiguous numpy array, in one
    strided torch copy (several times faster than numpy's for a transpose). bfloat16 comes back as its
    int16 bits: numpy has no bfloat16, and only the bytes are wanted."""
    import torch

    src = t.t() if transposed else t
    dtype = dtype or t.dtype
    if src.dtype == dtype and src.is_contiguous():
        out = src
    else:
        out = torch.empty(src.shape, dtype=dtype)
        out.copy_(src)
    return out.view(torch.int16).numpy() if dtype == torch.bfloat16 else out.numpy()


def weight_data(w) -> memoryview:
    """The payload bytes of a TensorProto or LazyWeight, without a copy where it can be avoided."""
    if isinstance(w, LazyWeight):
        return memoryview(w.array()).cast("B")
    return memoryview(tensor_bytes(w))



class WeightsFile:
    """Appends tensors to ``stage_dir/name`` (renamed into OUT by the caller) and points initializers at it.

    The bytes are written by one thread and hashed by another (file writes and sha256 release the GIL),
    one tensor behind the caller, which meanwhile makes the next tensor's bytes. An error of the writer
    is raised by the next call.
    """

    def __init__(self, stage_dir: Path, name: str, min_bytes: int = 1024):
        self.name = name
        self.path = Path(stage_dir) / name
        self.min_bytes = min_bytes
        self._fh = open(self.path, "w+b")
        self._stored: dict[tuple, list[tuple[int, int]]] = {}  # sample key -> (offset, length) stored under it
        self._by_source: dict[tuple, tuple[int, int]] = {}  # LazyWeight.source -> (offset, length)
        self._sha = hashlib.sha256()  # of the whole file, as written
        self._end = 0  # the file's length once the pending write is done
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"write-{name}")
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix=f"hash-{name}")
        self._pending: list[Future] = []

    @property
    def sha256(self) -> str:
        """The file's sha256, computed while writing."""
        self._wait()
        return self._sha.hexdigest()

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _write(self, pad: bytes, data: memoryview) -> None:
        self._fh.write(pad)
        self._fh.write(data)

    def _hash(self, pad: bytes, data: memoryview) -> None:
        self._sha.update(pad)
        self._sha.update(data)

    def _same_as_stored(self, data: memoryview, offset: int) -> bool:
        self._wait()
        self._fh.flush()
        fd = self._fh.fileno()
        for start in range(0, len(data), COMPARE_CHUNK):
            part = data[start:start + COMPARE_CHUNK]
            if os.pread(fd, len(part), offset + start) != part.tobytes():
                return False
        return True

    def _store(self, data: memoryview, data_type: int) -> tuple[int, int]:
        """Append ``data`` unless the same bytes (and type) are already in the file; returns where they are.

        Duplicates are found by type, length and the bytes at both ends, then confirmed byte for byte
        against the file: no digest of the whole tensor is needed."""
        key = (data_type, len(data), bytes(data[:SAMPLE]), bytes(data[-SAMPLE:]))
        for offset, length in self._stored.get(key, []):
            if self._same_as_stored(data, offset):
                return offset, length
        pad = (-self._end) % ALIGN
        offset = self._end + pad
        self._wait()
        self._pending = [self._writer.submit(self._write, b"\0" * pad, data),
                         self._hasher.submit(self._hash, b"\0" * pad, data)]
        self._end = offset + len(data)
        self._stored.setdefault(key, []).append((offset, len(data)))
        return offset, len(data)

    @staticmethod
    def _point(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            t.ClearField(field)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v

    def externalize(self, model: onnx.ModelProto, set_aside: list = ()) -> None:
        """Move the model's initializers (of at least ``min_bytes``) into the file, and attach the weights
        ``set_aside`` from the graph (declared as graph inputs; TensorProto or LazyWeight) as external
        initializers again."""
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            data = memoryview(tensor_bytes(t))
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
            source = getattr(w, "source", None)
            if source is not None and source in self._by_source:
                offset, length = self._by_source[source]
            else:
                offset, length = self._store(weight_data(w), w.data_type)
                if source is not None:
                    self._by_source[source] = (offset, length)
            stub = model.graph.initializer.add()
            stub.name, stub.data_type = w.name, w.data_type
            stub.dims.extend(w.dims)
            self._point(stub, self.name, offset, length)

    def close(self) -> None:
        """Finish the writes and make the file durable (raises the writer's error, if any)."""
        if self._fh.closed:
            return
        try:
            self._wait()
            self._fh.flush()
            os.fsync(self._fh.fileno())
        finally:
            self._writer.shutdown(wait=True)
            self._hasher.shutdown(wait=True)
            self._fh.close()
