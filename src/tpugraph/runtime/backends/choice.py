"""Pick and open the backend a command asked for: ``onnx`` (OUT's segments) or ``bmodel`` (a compiled bmodel)."""

from __future__ import annotations

from pathlib import Path

from ...contract.manifest import Manifest
from ...errors import UsageError
from . import BACKENDS, SegmentBackend


def find_bmodel(out_dir: Path, bmodel: str | Path | None) -> Path:
    """BMODEL as given, else the one *.bmodel in OUT (what `tpugraph compile` wrote)."""
    if bmodel is not None:
        return Path(bmodel)
    found = sorted(Path(out_dir).glob("*.bmodel"))
    if not found:
        raise UsageError(f"no .bmodel in '{out_dir}': compile it first (tpugraph compile {out_dir}) or pass --bmodel FILE")
    if len(found) > 1:
        raise UsageError(f"'{out_dir}' holds {len(found)} bmodels ({', '.join(p.name for p in found)}): "
                         "choose one with --bmodel FILE")
    return found[0]


def open_backend(kind: str, out_dir: Path, manifest: Manifest, bmodel: str | Path | None = None,
                 venv: str | Path | None = None) -> SegmentBackend:
    if kind not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)} (got '{kind}')")
    if kind == "onnx":
        if bmodel is not None:
            raise UsageError("--bmodel needs --backend bmodel")
        from .onnxruntime_backend import OnnxBackend

        return OnnxBackend(out_dir, manifest)
    from .bmodel_backend import BmodelBackend

    return BmodelBackend(find_bmodel(out_dir, bmodel), manifest, venv)
