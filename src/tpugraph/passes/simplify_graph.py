"""A graph -> its onnxsim-simplified form (big models go through files with external data)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from . import _graph
from . import onnxsim_process as _onnxsim_process
from .base import GraphPass, PassContext, PassFailed

log = logging.getLogger(__name__)

_METADATA_PREFIX = "onnxsim."
_COUNTS = {"removed_nodes": "onnxsim.removed_nodes.count", "changed_nodes": "onnxsim.changed_nodes.count",
           "removed_values": "onnxsim.removed_values.count"}


class Simplify(GraphPass):
    name = "simplify"
    summary = "onnxsim: fold constants, fuse and eliminate redundant ops (files + external data above 1.8 GB)"
    @dataclass(frozen=True)
    class Options:
        skip_fuse_bn: bool = False
        skipped_optimizers: list = field(default_factory=list)
        skip_constant_folding: bool = False
        tensor_size_threshold: str = "16MB"
        large_model_bytes: int = _graph.LARGE_MODEL_BYTES
    in_place = False

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "check_n": 0,  # tpugraph checks numerics itself (--check, check_numerics, verify)
            "skip_fuse_bn": bool(self.opts.skip_fuse_bn),
            "skipped_optimizers": list(self.opts.skipped_optimizers) or None,
            "skip_constant_folding": bool(self.opts.skip_constant_folding),
            "tensor_size_threshold": str(self.opts.tensor_size_threshold),
        }
        through_file = _graph.model_nbytes(model) > int(self.opts.large_model_bytes)
        # onnxsim prints notes; it runs in a child process that captures them per call (they go to the log)
        try:
            if through_file:
                out, ok, printed = _simplify_via_file(model, ctx.work_dir, kwargs)
            else:
                data, ok, printed = _onnxsim_process.simplify(model.SerializeToString(), kwargs)
                out = onnx.load_from_string(data)
        except _onnxsim_process.OnnxsimChildError as exc:
            raise PassFailed(str(exc)) from None
        if printed.strip():
            log.info("onnxsim on %s: %s", ctx.segment, " ".join(printed.split()))
        if not ok:
            raise PassFailed("onnxsim reported that the simplified model is not valid")
        details: dict[str, Any] = {"via_file": through_file}
        meta = {p.key: p.value for p in out.metadata_props}
        for key, meta_key in _COUNTS.items():
            if meta_key in meta and meta[meta_key].isdigit():
                details[key] = int(meta[meta_key])
        # onnxsim records its bookkeeping in the model; it belongs in the manifest, not the segment
        kept = [p for p in out.metadata_props if not p.key.startswith(_METADATA_PREFIX)]
        del out.metadata_props[:]
        out.metadata_props.extend(kept)
        details["nodes_removed"] = _graph.count_nodes(model) - _graph.count_nodes(out)
        return out, details


def _simplify_via_file(model: onnx.ModelProto, work_dir: Path | None,
                       kwargs: dict[str, Any]) -> tuple[onnx.ModelProto, bool, str]:
    """Never serialise a >2 GB protobuf: write the model with external data and let onnxsim read the path."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="simplify-", dir=work_dir))
    try:
        src, dst = tmp / "in.onnx", tmp / "out" / "out.onnx"
        dst.parent.mkdir()
        _graph.save_external(model, src)
        log.info("simplify: large model, going through %s", tmp)
        ok, printed = _onnxsim_process.simplify_file(str(src), str(dst), kwargs)
        out = onnx.load_model(dst, load_external_data=True)
        return out, ok, printed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
