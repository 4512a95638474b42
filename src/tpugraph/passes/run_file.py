"""One ONNX file + pass names -> the transformed file, optionally checked against the input in onnxruntime."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from tpugraph.errors import CheckFailedError, ModelError, OutputError, UsageError

from . import _graph, _numerics
from .base import PassContext, PassFailed, PassResult, failure_reason
from .chain import resolve_chain, run_chain

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4


@dataclass
class FileRunReport:
    input: Path
    output: Path
    chain: list[str]
    results: list[PassResult]
    max_abs_diff: dict[str, float] | None = None
    tolerance: float = DEFAULT_TOLERANCE
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "chain": self.chain,
            "options": self.options,
            "results": [r.to_json() for r in self.results],
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
        }


def load_model_file(path: Path, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file (with its external data unless told not to); a one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        model = onnx.load_model(str(path), load_external_data=load_external_data)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a readable ONNX model ({reason})") from exc
    if model.ir_version <= 0 or not model.HasField("graph") or not (model.graph.node or model.graph.output):
        raise ModelError(f"{path}: not an ONNX model (no IR version or empty graph)")
    return model


def context_for_file(path: Path, model: onnx.ModelProto, work_dir: Path | None = None) -> PassContext:
    """Segment name from the file stem; layer and kind from contract names (block_3, block_kv_3, block_cache_3, ...)."""
    from tpugraph.contract.segments import SegmentKind

    stem = Path(path).stem
    layer: int | None = None
    kind: str | None = None
    m = re.fullmatch(r"(block_cache|block_kv|block)_(\d+)", stem)
    if m:
        kind, layer = m.group(1), int(m.group(2))
    elif stem in {k.value for k in SegmentKind}:
        kind = stem
    shapes: dict[str, tuple[int, ...]] = {}
    inits = {t.name for t in model.graph.initializer}
    for v in (*model.graph.input, *model.graph.output):
        shape = _graph.static_shape(v)
        if v.name not in inits and shape is not None:
            shapes[v.name] = shape
    return PassContext(segment=stem, shapes=shapes, work_dir=work_dir, layer=layer, kind=kind)


def run_passes_on_file(in_path: Path | str, out_path: Path | str, names: list[str] | str, check: bool = False,
                       tolerance: float = DEFAULT_TOLERANCE, work_dir: Path | None = None,
                       options: dict[str, dict[str, Any]] | None = None) -> FileRunReport:
    """Run passes on IN and write OUT (external data above 1.8 GB), exactly as the full chain would.

    OUT appears only when everything succeeded (written under a temporary name, then renamed);
    IN is never written unless it is also OUT. With ``check``, IN and OUT run in onnxruntime on the
    same random inputs and CheckFailedError is raised if an output differs by more than ``tolerance``.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    chain = resolve_chain(_as_list(names), options=options)
    if not chain:
        raise UsageError("no passes to run")
    model = load_model_file(in_path)
    ctx = context_for_file(in_path, model, work_dir)
    reference = _reference(model, in_path, work_dir) if check else None
    result, results = run_chain(model, chain, ctx)
    report = FileRunReport(in_path, out_path, [p.name for p in chain], results, tolerance=tolerance,
                           options={p.name: p.options() for p in chain})
    if reference is not None:
        perms = _merged_io_perms(results)
        try:
            diffs = reference.diffs(result, perms, work_dir)
        except Exception as exc:
            reason = failure_reason(exc)
            raise CheckFailedError(f"{out_path.name}: cannot compare with {in_path.name}: {reason}") from exc
        report.max_abs_diff = diffs
        bad = {k: v for k, v in diffs.items() if not v <= tolerance}
        if bad:
            listed = ", ".join(f"{k}: {v:.3g}" for k, v in bad.items())
            raise CheckFailedError(f"{out_path.name} differs from {in_path.name} above tolerance {tolerance:g} "
                                    f"({listed}); not written")
    try:
        write_model_atomic(result, out_path)
    except OSError as exc:
        raise OutputError(f"cannot write {out_path}: {exc.strerror or exc}") from exc
    return report


def _reference(model: onnx.ModelProto, in_path: Path, work_dir: Path | None) -> _numerics.Reference:
    try:
        return _numerics.Reference.compute(model, work_dir)
    except PassFailed as exc:  # dynamic input dims: no data can be generated for them
        raise UsageError(f"--check needs static input shapes: {exc}") from exc
    except Exception as exc:
        reason = failure_reason(exc)
        raise ModelError(f"{in_path.name} does not run in onnxruntime, cannot --check: {reason}") from exc


def _as_list(names: list[str] | str) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _merged_io_perms(results: list[PassResult]) -> dict[str, dict[str, list[int]]] | None:
    merged: dict[str, dict[str, list[int]]] = {"inputs": {}, "outputs": {}}
    for r in results:
        perms = r.io_perms
        if isinstance(perms, dict):
            for side in ("inputs", "outputs"):
                merged[side].update(perms.get(side, {}))
    return merged if any(merged.values()) else None


def write_model_atomic(model: onnx.ModelProto, out_path: Path) -> None:
    """Write into a temporary folder next to OUT, then move into place (data file first, model last)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        staged = tmp / out_path.name
        data_name = f"{out_path.name}.data"
        if _graph.is_large(model):
            _graph.save_external(model, staged, location=data_name)
            os.replace(tmp / data_name, out_path.parent / data_name)
        else:
            onnx.save_model(model, staged)
        os.replace(staged, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", out_path)
