"""OUT/manifest.json: what was exported, from what, with which tools, and how each segment was processed."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputError, VerificationError
from .manifest_records import (
    Conventions,
    ExportStats,
    ExternalDataFile,
    ModelRecord,
    PassChainEntry,
    RecordedOptions,
    TestDataRecord,
    ToolVersions,
)
from .records import JsonRecord, extra_keys, not_json, optional
from .segments import SegmentKind, TensorSpec

MANIFEST_NAME = "manifest.json"
PARTIAL_NAME = ".tpugraph-partial.json"  # the manifest of an unfinished run: finished segments only
FORMAT = "tpugraph-manifest"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_test_data(value: Any) -> TestDataRecord:
    # an early tpugraph noted the npz file alone
    return TestDataRecord(file=value) if isinstance(value, str) else TestDataRecord.from_json(value)


@dataclass(kw_only=True)
class SegmentEntry(JsonRecord):
    """One exported segment: its file and digests, its I/O, the passes it went through and how it was made."""

    name: str
    kind: SegmentKind
    layer: int | None
    file: str
    size: int = 0
    sha256: str = ""
    external_data: list[ExternalDataFile] = field(default_factory=list)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    passes: list[dict[str, Any]] = field(default_factory=list)  # each pass's result (passes/base.py PassResult)
    io_mapping: dict[str, str] | None = optional()  # old -> new I/O names, when a pass renamed them
    unused_inputs: list[str] | None = optional()  # contract inputs the graph does not read
    fingerprint: str | None = optional()  # what the segment was made from: a rerun keeps it when unchanged
    graph_reused_from: str | None = optional()  # weight swapping: the segment whose optimised graph it reuses
    export_seconds: float | None = optional()
    test_data: TestDataRecord | None = optional()
    extra: dict[str, Any] = extra_keys()

    union_readers = {"test_data": _read_test_data}

    def record_files(self, out_dir: Path, digests: dict[str, str] | None = None) -> None:
        """Fill size and sha256 of the segment file and of its external-data files. ``digests`` (file name ->
        sha256) lets the segments sharing a data file, written together, read it once."""
        digests = {} if digests is None else digests
        path = out_dir / self.file
        self.size = path.stat().st_size
        self.sha256 = sha256_file(path)
        for ext in self.external_data:
            p = out_dir / ext.file
            ext.size = p.stat().st_size
            if ext.file not in digests:
                digests[ext.file] = sha256_file(p)
            ext.sha256 = digests[ext.file]


@dataclass(frozen=True)
class ExportRun:
    """What the export call that returned a manifest did: segments kept from an earlier run (same inputs, files
    as recorded) and segments built. Not written to manifest.json (a rerun must write the same manifest)."""

    kept: tuple[str, ...]
    built: tuple[str, ...]
    seconds: float

    def summary(self) -> str:
        total = len(self.kept) + len(self.built)
        if not self.built:
            return f"kept {total} of {total} segments, nothing to do"
        if not self.kept:
            return f"built {total} segments"
        return f"kept {len(self.kept)}, built {len(self.built)} of {total} segments"


@dataclass(kw_only=True)
class Manifest(JsonRecord):
    """OUT/manifest.json. Its keys, in order, are the fields'; keys this tpugraph does not know are kept."""

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    complete: bool = False
    model: ModelRecord
    tools: ToolVersions
    conventions: Conventions
    options: RecordedOptions
    pass_chain: list[PassChainEntry] = field(default_factory=list)
    # Plain-language statements of where the export is exact and where it is not (sliding windows, rope).
    notes: list[str] = field(default_factory=list)
    stats: ExportStats = field(default_factory=ExportStats)  # how the run went: segments traced, weight-swapped
    segments: list[SegmentEntry] = field(default_factory=list)
    last_run: ExportRun | None = not_json()  # set by the export call that returned it
    extra: dict[str, Any] = extra_keys()

    def segment(self, name: str) -> SegmentEntry:
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(name)

    def kinds(self) -> set[SegmentKind]:
        return {s.kind for s in self.segments}

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "format": FORMAT, "format_version": FORMAT_VERSION}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != FORMAT:
            raise VerificationError("not a tpugraph manifest (format field missing or wrong)")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise VerificationError(
                f"manifest format_version {d.get('format_version')} is newer than this tpugraph reads ({FORMAT_VERSION})"
            )
        return super().from_json(d)

    def write(self, out_dir: Path, name: str = MANIFEST_NAME) -> Path:
        """Atomically replace OUT/manifest.json (or another manifest file name)."""
        target = Path(out_dir) / name
        tmp = target.with_name(f".{name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
        return target


def read_manifest(out_dir: Path, name: str = MANIFEST_NAME) -> Manifest:
    path = Path(out_dir) / name
    if not Path(out_dir).is_dir():
        raise OutputError(f"'{out_dir}' is not a folder")
    if not path.is_file():
        if (Path(out_dir) / PARTIAL_NAME).is_file():
            raise VerificationError(f"'{out_dir}' has no {name}: an unfinished export: rerun it to finish")
        raise OutputError(f"'{out_dir}' has no {name}: not a tpugraph output")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VerificationError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    try:
        return Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise VerificationError(f"{path} is malformed: missing or bad field {exc}") from None


def graph_io(model) -> tuple[list[TensorSpec], list[TensorSpec], list[str]]:
    """Declared graph inputs (initializers excluded) and outputs, and every dynamic dim among them."""
    dynamic: list[str] = []
    inits = {i.name for i in model.graph.initializer}
    ins = [TensorSpec.from_value_info(v, dynamic) for v in model.graph.input if v.name not in inits]
    outs = [TensorSpec.from_value_info(v, dynamic) for v in model.graph.output]
    return ins, outs, dynamic


def _onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], list[str]]:
    """Declared graph I/O of an ONNX file, read without its external weights."""
    import onnx

    return graph_io(onnx.load(str(path), load_external_data=False))


def validate(out_dir: Path) -> list[str]:
    """Every mismatch between OUT's manifest and its files; empty when all is consistent."""
    out_dir = Path(out_dir)
    from .json_schema import schema_problems

    manifest = read_manifest(out_dir)
    problems = schema_problems(json.loads((out_dir / MANIFEST_NAME).read_text()))  # manifest.schema.json
    if not manifest.complete:
        problems.append("manifest is marked incomplete: the run that wrote it did not finish")
    table = manifest.conventions.embedding_disk
    if table:  # --embedding-disk: the vocabulary rows the host gathers
        path = out_dir / table.file
        if not path.is_file():
            problems.append(f"embedding table {table.file} is missing")
        elif path.stat().st_size != table.size or sha256_file(path) != table.sha256:
            problems.append(f"embedding table {table.file}: size or sha256 does not match the manifest")
    for seg in manifest.segments:
        path = out_dir / seg.file
        if not path.is_file():
            problems.append(f"{seg.name}: file {seg.file} is missing")
            continue
        if path.stat().st_size != seg.size:
            problems.append(f"{seg.name}: size of {seg.file} is {path.stat().st_size}, manifest says {seg.size}")
        if sha256_file(path) != seg.sha256:
            problems.append(f"{seg.name}: sha256 of {seg.file} does not match the manifest")
        for ext in seg.external_data:
            ep = out_dir / ext.file
            if not ep.is_file():
                problems.append(f"{seg.name}: external data {ext.file} is missing")
            elif sha256_file(ep) != ext.sha256:
                problems.append(f"{seg.name}: sha256 of external data {ext.file} does not match the manifest")
        try:
            ins, outs, dyn = _onnx_io(path)
        except Exception as exc:
            problems.append(f"{seg.name}: {seg.file} is not a readable ONNX file: {str(exc).splitlines()[0]}")
            continue
        problems.extend(f"{seg.name}: dynamic dim {d}" for d in dyn)
        for label, want, got in (("inputs", seg.inputs, ins), ("outputs", seg.outputs, outs)):
            if [t.to_json() for t in want] != [t.to_json() for t in got]:
                problems.append(
                    f"{seg.name}: {label} in the file {[(t.name, list(t.shape), t.dtype) for t in got]} "
                    f"!= manifest {[(t.name, list(t.shape), t.dtype) for t in want]}"
                )
    return problems
