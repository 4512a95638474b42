"""Writing a run's results: a unit's files staged, fsynced and renamed into OUT (data file first, each .onnx
last, so a file under its final name is always complete), and the partial manifest recording each
committed unit. Single-threaded: the scheduler decides when (and in which thread) a commit runs."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..contract.manifest import PARTIAL_NAME, Manifest, SegmentEntry
from ..contract.manifest_records import ExternalDataFile
from ..errors import OutputError
from .plan import WorkUnit

log = logging.getLogger(__name__)

LARGE_MODEL_BYTES = 1_800_000_000  # past this a segment's weights go to external data (protobuf's 2 GB limit)


def _serialized(model) -> bytes | None:
    """The model's bytes (onnx.save_model's), or None when it is past LARGE_MODEL_BYTES. Serialized once: sizing
    the message first (ByteSize) costs as much as serializing it."""
    try:
        data = model.SerializeToString()
    except Exception:  # protobuf refuses to serialize messages past 2 GB
        return None
    return data if len(data) <= LARGE_MODEL_BYTES else None


def _write(path: Path, data: bytes) -> None:
    """One inline segment's bytes into its staging file."""
    with open(path, "wb") as fh:
        fh.write(data)


class UnitWriter:
    """Writes a unit's segments into a staging folder inside OUT, then renames the data file first and each
    .onnx last, so a file under its final name is always complete."""

    def __init__(self, out_dir: Path, unit: WorkUnit):
        from .external_data import WeightsFile

        self.out_dir = out_dir
        self.unit = unit
        self.stage = Path(tempfile.mkdtemp(prefix=f".tpugraph-stage-{unit.name}-", dir=out_dir))
        self.weights_file = WeightsFile(self.stage, unit.data_file) if unit.data_file else None
        self.files: list[str] = []

    def add(self, built) -> list[ExternalDataFile]:
        """Stage one built segment (export.factory.BuiltSegment); returns its external-data entries."""
        import onnx

        spec = built.spec
        external: list[ExternalDataFile] = []
        try:
            if self.weights_file is not None:
                self.weights_file.externalize(built.model, built.weights)
                built.weights = []
                external.append(ExternalDataFile(file=self.unit.data_file))
                onnx.save_model(built.model, str(self.stage / spec.filename))
                self.files.append(spec.filename)
                return external
            data = _serialized(built.restored())
            if data is not None:
                _write(self.stage / spec.filename, data)
            else:
                raise OutputError(f"{spec.name} is over 2 GB and cannot be written inline; use --external-data auto")
        except OSError as exc:
            raise OutputError(f"cannot write {self.out_dir / spec.filename}: {exc.strerror or exc}") from None
        self.files.append(spec.filename)
        return external

    def digests(self) -> dict[str, str]:
        """sha256 of the files already hashed while they were written (the unit's data file)."""
        if self.weights_file is None:
            return {}
        return {self.unit.data_file: self.weights_file.sha256}

    def commit(self) -> None:
        try:
            if self.weights_file is not None:
                self.weights_file.close()
                os.replace(self.stage / self.unit.data_file, self.out_dir / self.unit.data_file)
            for name in self.files:
                os.replace(self.stage / name, self.out_dir / name)
        except OSError as exc:
            raise OutputError(f"cannot write into {self.out_dir}: {exc.strerror or exc}") from None
        finally:
            self.discard()

    def discard(self) -> None:
        if self.weights_file is not None:
            try:
                self.weights_file.close()
            except OSError:
                pass
        shutil.rmtree(self.stage, ignore_errors=True)


class Committer:
    """Commits finished units and records them (and kept ones) in the partial manifest, in call order."""

    def __init__(self, out_dir: Path, manifest: Manifest):
        self.out_dir = out_dir
        self.manifest = manifest

    def commit(self, writer: UnitWriter, entries: list[SegmentEntry]) -> None:
        writer.commit()
        digests = writer.digests()  # the unit's shared data file was hashed as it was written
        for entry in entries:
            entry.record_files(self.out_dir, digests)
        self.record(entries)

    def record(self, entries: list[SegmentEntry]) -> None:
        """Add segments to the manifest and rewrite the partial manifest (atomically)."""
        self.manifest.segments.extend(entries)
        self.manifest.write(self.out_dir, PARTIAL_NAME)
