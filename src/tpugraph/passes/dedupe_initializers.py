"""Initializers with identical type, dims and bytes -> one shared initializer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import onnx

from . import _graph
from .base import GraphPass, PassContext


class DedupeInitializers(GraphPass):
    name = "dedupe_initializers"
    summary = "Merge initializers with identical dtype, dims and bytes (hash, then byte-exact compare)"
    @dataclass(frozen=True)
    class Options:
        max_bytes: Any = None

    def validate(self) -> None:
        from tpugraph.errors import UsageError

        limit = self.opts.max_bytes
        if limit is not None and int(limit) < 0:
            raise UsageError("dedupe_initializers: max_bytes must be >= 0 or None (no limit)")

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
        graph = model.graph
        limit = self.opts.max_bytes
        # overridable initializers (also listed as graph inputs) are inputs of the segment: never merged
        inputs = {v.name for v in graph.input}
        keepers: dict[tuple, list[onnx.TensorProto]] = {}
        replace: dict[str, str] = {}
        saved = 0
        for t in graph.initializer:
            if t.name in inputs or _graph.is_external(t):
                continue
            nbytes = _graph.tensor_nbytes(t)
            if limit is not None and nbytes > int(limit):
                continue
            data = _graph.tensor_bytes(t)
            key = (t.data_type, tuple(t.dims), len(data), hashlib.blake2b(data, digest_size=16).digest())
            same = next((k for k in keepers.get(key, []) if _graph.tensor_bytes(k) == data), None)
            if same is None:
                keepers.setdefault(key, []).append(t)
            else:
                replace[t.name] = same.name
                saved += nbytes
        if replace:
            for old, new in replace.items():
                _graph.replace_uses(graph, old, new)
            doomed = [i for i, t in enumerate(graph.initializer) if t.name in replace]
            for i in reversed(doomed):  # by index, never copying the (possibly huge) tensors
                del graph.initializer[i]
            stale = [v for v in graph.value_info if v.name in replace]
            for v in stale:
                graph.value_info.remove(v)
        groups = len({new for new in replace.values()})
        return model, {"merged": len(replace), "groups": groups, "bytes_saved": saved}

