"""Messages between tpugraph and a runtime driver over a pipe: a JSON header plus raw arrays.

One message: 8-byte big-endian length, that many bytes of UTF-8 JSON, then the bytes of each array the header
lists under "arrays" ({"dtype", "shape"}), C order, back to back. Plain numpy and the standard library only:
the driver imports this module from the tpu-mlir venv's Python 3.10 without tpugraph installed.
"""

from __future__ import annotations

import json
import struct
from typing import BinaryIO

import numpy as np

_LENGTH = struct.Struct(">Q")


def write_message(stream: BinaryIO, header: dict, arrays: list | tuple = ()) -> None:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = dict(header, arrays=[{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays])
    body = json.dumps(header).encode()
    stream.write(_LENGTH.pack(len(body)) + body)
    for a in arrays:
        stream.write(a.tobytes())
    stream.flush()


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError(f"pipe closed with {left} of {size} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(stream: BinaryIO) -> tuple[dict, list[np.ndarray]]:
    (size,) = _LENGTH.unpack(_read_exact(stream, _LENGTH.size))
    header = json.loads(_read_exact(stream, size))
    arrays = []
    for spec in header.pop("arrays", []):
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        arrays.append(np.frombuffer(_read_exact(stream, count * dtype.itemsize), dtype=dtype).reshape(shape).copy())
    return header, arrays
