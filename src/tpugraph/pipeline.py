"""The main job as a library call: MODEL -> OUT with every segment exported, optimised and described."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .contract import KV_LAYOUT, MASK_VALUE, ContractDims, SegmentSpec, segment_specs
from .errors import OutputError, TpugraphError, UsageError
from .manifest import MANIFEST_NAME, PARTIAL_NAME, Manifest, SegmentEntry, read_manifest, sha256_file
from .model_source import ModelSource, WeightStore, load_config, model_facts, resolve_model

log = logging.getLogger(__name__)

LARGE_MODEL_BYTES = 1_800_000_000  # past this a segment's weights go to external data (protobuf's 2 GB limit)
EXTERNAL_MIN_BYTES = 16 * 1024 * 1024  # auto: a unit with more weights than this shares one external-data file
EXTERNAL_DATA_MODES = ("auto", "always", "never")
INT_DTYPES = ("int32", "int64")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ExportOptions:
    seq_length: int = 512
    int_dtype: str = "int32"
    dtype: str = "float32"
    passes: list[str] | None = None  # None = the default chain
    skip_passes: list[str] = field(default_factory=list)
    pass_options: dict[str, dict] = field(default_factory=dict)  # {"rename_kv_io": {"convention": "optimum"}}
    force: bool = False
    trust_remote_code: bool = False
    external_data: str = "auto"  # auto | always | never
    weight_swap: bool = True  # reuse one layer's optimised graph for the other layers of the same structure
    penalty_head: bool = False  # also export penalty_sample_head.onnx (CONTRACT.md)
    greedy_in_lm_head: bool = False  # lm_head -> (token, m_logits) and no greedy_head.onnx
    jobs: int = 1  # work units (vocabulary, each layer) built in parallel threads

    def check(self) -> None:
        if self.external_data not in EXTERNAL_DATA_MODES:
            raise UsageError(f"--external-data must be one of {', '.join(EXTERNAL_DATA_MODES)} (got {self.external_data})")
        if self.seq_length < 1:
            raise UsageError(f"--seq-length must be >= 1 (got {self.seq_length})")
        if self.int_dtype not in INT_DTYPES:
            raise UsageError(f"--int-dtype must be one of {', '.join(INT_DTYPES)} (got {self.int_dtype})")
        if self.jobs < 1:
            raise UsageError(f"--jobs must be >= 1 (got {self.jobs})")
        if self.dtype not in FLOAT_DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)} (got {self.dtype})")


def tool_versions() -> dict[str, str]:
    import onnx
    import torch
    import transformers

    versions = {"tpugraph": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "onnx": onnx.__version__}
    try:
        import onnxsim

        versions["onnxsim"] = getattr(onnxsim, "__version__", "unknown")
    except ImportError:
        versions["onnxsim"] = "not installed"
    return versions


def prepare_output_dir(out: Path, force: bool) -> None:
    """Create OUT, or accept it when it is empty or an earlier tpugraph output; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output '{out}' exists and is not a folder")
    if out.is_dir():
        entries = [p for p in out.iterdir() if not p.name.startswith(".tpugraph")]
        ours = (out / MANIFEST_NAME).is_file() or (out / PARTIAL_NAME).is_file()
        if entries and not ours and not force:
            raise OutputError(f"output folder '{out}' is not empty and is not a tpugraph output (use --force to write into it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in list(out.glob(".tpugraph-stage-*")) + list(out.glob(".tpugraph-work-*")):
            shutil.rmtree(leftover, ignore_errors=True)  # scratch of a run that was killed
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".tpugraph-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(f"output folder '{out}' is not writable: {exc.strerror or exc}") from None


def _fits_protobuf(model) -> bool:
    try:
        return model.ByteSize() <= LARGE_MODEL_BYTES
    except Exception:  # protobuf refuses to size messages past 2 GB
        return False


@dataclass
class WorkUnit:
    """Segments exported, written and resumed together because they hold the same weights."""

    name: str
    specs: list[SegmentSpec]
    weight_prefixes: list[str]
    data_file: str | None = None  # the external-data file the unit's segments share, if any


def plan_units(specs: list[SegmentSpec], family, weights: WeightStore, dtype_bytes: int,
               external_data: str) -> list[WorkUnit]:
    """vocab (embedding, embedding_cache, lm_head), one unit per layer (block_i, block_cache_i), then the heads."""
    from .contract import SegmentKind
    from .resume import segment_weight_prefixes

    units: dict[str, WorkUnit] = {}
    for spec in specs:
        if spec.kind in (SegmentKind.EMBEDDING, SegmentKind.EMBEDDING_CACHE, SegmentKind.LM_HEAD):
            name = "vocab"
        elif spec.layer is not None:
            name = f"layer_{spec.layer}"
        else:
            name = spec.name
        unit = units.setdefault(name, WorkUnit(name, [], []))
        unit.specs.append(spec)
        for prefix in segment_weight_prefixes(family, spec):
            if prefix not in unit.weight_prefixes:
                unit.weight_prefixes.append(prefix)
    for unit in units.values():
        if not unit.weight_prefixes or external_data == "never":
            continue
        nbytes = sum(math.prod(weights.shape_and_dtype(k)[0]) * dtype_bytes
                     for k in weights.keys() if any(k.startswith(p) for p in unit.weight_prefixes))
        if external_data == "always" or nbytes >= EXTERNAL_MIN_BYTES:
            unit.data_file = f"{unit.name}.data"
    order = {spec.name: i for i, spec in enumerate(specs)}
    return sorted(units.values(), key=lambda u: order[u.specs[0].name])


class UnitWriter:
    """Writes a unit's segments into a staging folder inside OUT, then renames the data file first and each
    .onnx last, so a file under its final name is always complete."""

    def __init__(self, out_dir: Path, unit: WorkUnit):
        from .export.external_data import WeightsFile

        self.out_dir = out_dir
        self.unit = unit
        self.stage = Path(tempfile.mkdtemp(prefix=f".tpugraph-stage-{unit.name}-", dir=out_dir))
        self.weights_file = WeightsFile(self.stage, unit.data_file) if unit.data_file else None
        self.files: list[str] = []

    def add(self, built) -> list[dict]:
        """Stage one built segment (export.factory.BuiltSegment); returns its external-data entries."""
        import onnx

        spec = built.spec
        external: list[dict] = []
        try:
            if self.weights_file is not None:
                self.weights_file.externalize(built.model, built.weights)
                built.weights = []
                external.append({"file": self.unit.data_file})
                onnx.save_model(built.model, str(self.stage / spec.filename))
                self.files.append(spec.filename)
                return external
            model = built.restored()
            if _fits_protobuf(model):
                onnx.save_model(model, str(self.stage / spec.filename))
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


class Finisher:
    """Commits finished units in a background thread (fsync, renames, file sizes and hashes, the partial
    manifest) while the next unit is built. At most one unit is in flight; ``wait`` raises its error."""

    def __init__(self, out_dir: Path, manifest: Manifest):
        self.out_dir = out_dir
        self.manifest = manifest
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="commit")
        self._in_flight: Future | None = None
        self._lock = threading.Lock()  # units built in parallel (--jobs) submit from several threads

    def _finish(self, writer: UnitWriter, entries: list[SegmentEntry]) -> None:
        writer.commit()
        digests = writer.digests()  # the unit's shared data file was hashed as it was written
        for entry in entries:
            entry.record_files(self.out_dir, digests)
        self._record(entries)

    def _record(self, entries: list[SegmentEntry]) -> None:
        self.manifest.segments.extend(entries)
        self.manifest.write(self.out_dir, PARTIAL_NAME)

    def _then(self, job, *args) -> None:
        with self._lock:
            self._wait()
            self._in_flight = self._pool.submit(job, *args)

    def submit(self, writer: UnitWriter, entries: list[SegmentEntry]) -> None:
        self._then(self._finish, writer, entries)

    def keep(self, entries: list[SegmentEntry]) -> None:
        """Record segments an earlier run finished (in order with the commits)."""
        self._then(self._record, entries)

    def wait(self) -> None:
        with self._lock:
            self._wait()

    def _wait(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def close(self, failing: bool) -> None:
        """Let the unit in flight finish; when the run is already failing, its own error is only logged."""
        try:
            self.wait()
        except Exception as exc:
            if not failing:
                raise
            log.info("while stopping: %s", exc)
        finally:
            self._pool.shutdown(wait=True)


ProgressFn = Callable[[str, int, int], None]  # (segment, index, total)


def _previous_entries(out_dir: Path) -> dict[str, SegmentEntry]:
    """Segments an earlier run into OUT finished (from its manifest, or its partial manifest)."""
    for name in (MANIFEST_NAME, PARTIAL_NAME):
        path = out_dir / name
        if path.is_file():
            try:
                return {s.name: s for s in read_manifest(out_dir, name).segments}
            except TpugraphError:
                return {}
    return {}


def _still_valid(entry: SegmentEntry, out_dir: Path, fingerprint: str, digests: dict[str, str]) -> bool:
    """The entry was made from the same inputs and its files are as it recorded them. ``digests`` caches
    the sha256 of files already read in this check (a data file shared by a unit's segments)."""
    if entry.extra.get("fingerprint") != fingerprint:
        return False
    files = [(entry.file, entry.size, entry.sha256)] + [(e["file"], e.get("size"), e.get("sha256")) for e in entry.external_data]
    for name, size, digest in files:
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
        if name not in digests:
            digests[name] = sha256_file(path)
        if digests[name] != digest:
            return False
    return True


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class _Stopped(Exception):
    """Another unit of a parallel run failed: this one stops before its next segment."""


class _UnitRun:
    """Builds, writes and records work units, one at a time or several in parallel threads (``--jobs``)."""

    def __init__(self, out_dir: Path, previous: dict[str, SegmentEntry], finisher: Finisher,
                 progress: ProgressFn | None, total: int, make_factory: Callable):
        self.out_dir = out_dir
        self.previous = previous
        self.finisher = finisher
        self.progress = progress
        self.total = total
        self._make_factory = make_factory
        self.factory = None
        self._done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _factory(self):
        with self._lock:
            if self.factory is None:
                self.factory = self._make_factory()
            return self.factory

    def _step(self, name: str) -> None:
        with self._lock:
            done, self._done = self._done, self._done + 1
        if self.progress:
            self.progress(name, done, self.total)

    def unit(self, unit: WorkUnit, pending_fingerprint: Future) -> None:
        from .export.exporter import unused_graph_inputs

        fingerprint = pending_fingerprint.result()
        kept = [self.previous.get(spec.name) for spec in unit.specs]
        seen: dict[str, str] = {}
        if all(e is not None and _still_valid(e, self.out_dir, fingerprint, seen) for e in kept):
            for entry in kept:
                log.info("%s: unchanged since the last run, kept", entry.name)
                self._step(entry.name)
            self.finisher.keep(kept)
            return
        factory = self._factory()
        writer = UnitWriter(self.out_dir, unit)
        entries = []
        try:
            for spec in unit.specs:
                if self._stop.is_set():
                    raise _Stopped()
                self._step(spec.name)
                t0 = time.perf_counter()
                built = factory.build(spec)
                entry = SegmentEntry(name=spec.name, kind=spec.kind.value, layer=spec.layer, file=spec.filename,
                                     inputs=list(spec.inputs), outputs=list(spec.outputs))
                _apply_renames(entry, built.pass_results)
                if unused := unused_graph_inputs(built.model):
                    entry.extra["unused_inputs"] = unused
                entry.passes = [r.to_json() for r in built.pass_results]
                entry.extra["fingerprint"] = fingerprint
                swapped_from = built.swapped_from
                if swapped_from:
                    entry.extra["graph_reused_from"] = swapped_from
                entry.external_data = writer.add(built)
                del built
                entry.extra["export_seconds"] = round(time.perf_counter() - t0, 3)
                log.info("%s done (%.2fs%s)", spec.name, time.perf_counter() - t0,
                         f", weights swapped into the graph of {swapped_from}" if swapped_from else "")
                entries.append(entry)
        except BaseException:
            writer.discard()
            raise
        self.finisher.submit(writer, entries)

    def in_parallel(self, units: list[WorkUnit], fingerprints: list[Future], jobs: int) -> None:
        """Run the units in ``jobs`` threads. The first unit of each layer structure (the one whose graph
        the others reuse) runs before them, so the result is the same as a one-job run, byte for byte."""
        from .export.factory import LAYER_KINDS

        factory = self._factory()
        leaders: dict[tuple, Future] = {}
        futures: list[Future] = []
        with ThreadPoolExecutor(jobs, thread_name_prefix="unit") as pool:
            try:
                for unit, fingerprint in zip(units, fingerprints):
                    key = tuple(factory.layer_key(s) for s in unit.specs if s.kind in LAYER_KINDS) or None
                    leader = leaders.get(key) if key else None
                    future = pool.submit(self._after, leader, unit, fingerprint)
                    if key and key not in leaders:
                        leaders[key] = future
                    futures.append(future)
                errors = []
                for future in futures:
                    try:
                        future.result()
                    except _Stopped:
                        pass
                    except BaseException as exc:  # noqa: BLE001 - the first error is raised below
                        self._stop.set()
                        errors.append(exc)
                if errors:
                    raise errors[0]
            except BaseException:
                self._stop.set()
                raise

    def _after(self, leader: Future | None, unit: WorkUnit, fingerprint: Future) -> None:
        if leader is not None:
            try:
                leader.result()
            except BaseException:
                raise _Stopped() from None
        self.unit(unit, fingerprint)


def export_and_optimize(model: str, out: str | Path, options: ExportOptions | None = None,
                        progress: ProgressFn | None = None,
                        pass_progress: Callable[[str, str, int, int], None] | None = None) -> Manifest:
    """Export MODEL (folder or preset) into OUT: every segment of the contract, passed through the chain,
    then OUT/manifest.json, written last. Segments an earlier run finished with the same inputs are kept."""
    from .export.exporter import DEFAULT_OPSET, ModelParts, export_notes, unused_inputs_note
    from .export.factory import SegmentFactory
    from .resume import unit_fingerprint
    from .tokenizer_files import copy_tokenizer

    options = options or ExportOptions()
    options.check()
    out_dir = Path(out)
    source: ModelSource = resolve_model(model)
    config, family = load_config(source, options.trust_remote_code)
    facts = model_facts(config, family)
    if facts.max_positions and options.seq_length > facts.max_positions:
        raise UsageError(
            f"--seq-length {options.seq_length} exceeds the model's max_position_embeddings ({facts.max_positions})"
        )
    weights = WeightStore(source.path)
    chain = _resolve_chain(options)
    prepare_output_dir(out_dir, options.force)
    previous = _previous_entries(out_dir)
    # From here on OUT is being changed: no manifest.json until every segment is done again.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    dims = ContractDims(seq=options.seq_length, hidden=facts.hidden_size, kv_heads=facts.num_kv_heads,
                        head_dim=facts.head_dim, vocab=facts.vocab_size, layers=facts.num_layers,
                        int_dtype=options.int_dtype)
    specs = segment_specs(dims, with_penalty_head=options.penalty_head, greedy_in_lm_head=options.greedy_in_lm_head)
    units = plan_units(specs, family, weights, DTYPE_BYTES[options.dtype], options.external_data)
    tools = tool_versions()
    manifest = Manifest(
        model={**facts.to_json(), "source": source.to_json()},
        tools=tools,
        conventions={"kv_layout": KV_LAYOUT, "mask_value": MASK_VALUE, "opset": DEFAULT_OPSET,
                     "naming": _naming(chain), "int_dtype": options.int_dtype, "float_dtype": "float32",
                     "batch": 1},
        options={"seq_length": options.seq_length, "dtype": options.dtype, "int_dtype": options.int_dtype,
                 "external_data": options.external_data, "penalty_head": options.penalty_head,
                 "greedy_in_lm_head": options.greedy_in_lm_head},
        pass_chain=[{"name": p.name, "options": p.options()} for p in chain],
    )
    config_json = config.to_dict()
    work = Path(tempfile.mkdtemp(prefix=".tpugraph-work-", dir=out_dir))
    finisher = Finisher(out_dir, manifest)
    def make_factory() -> SegmentFactory:
        factory = SegmentFactory(ModelParts(config, family, weights, options.dtype), chain, options.seq_length,
                                 options.int_dtype, work, options.weight_swap)
        factory.on_pass = pass_progress
        return factory

    run = _UnitRun(out_dir, previous, finisher, progress, len(specs), make_factory)
    failing = True
    # The units' fingerprints (hashes of their weights) are computed ahead, in a thread of their own.
    hasher = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")
    fingerprints = [hasher.submit(unit_fingerprint, unit.specs, unit.weight_prefixes, unit.data_file, weights,
                                  config_json, manifest.options, manifest.pass_chain, tools) for unit in units]
    try:
        if options.jobs <= 1:
            for unit, fingerprint in zip(units, fingerprints):
                run.unit(unit, fingerprint)
        else:
            run.in_parallel(units, fingerprints, options.jobs)
        failing = False
    finally:
        hasher.shutdown(wait=True, cancel_futures=True)
        finisher.close(failing)
        shutil.rmtree(work, ignore_errors=True)
    factory = run.factory
    if factory is not None:
        manifest.stats = {"segments_traced": factory.traced, "segments_weight_swapped": factory.swapped}
    order = {spec.name: i for i, spec in enumerate(specs)}
    manifest.segments.sort(key=lambda e: order[e.name])
    unused = {e.name: e.extra["unused_inputs"] for e in manifest.segments if e.extra.get("unused_inputs")}
    manifest.notes = export_notes(family, config, options.seq_length, options.dtype) + (
        [unused_inputs_note(unused)] if unused else [])
    for note in manifest.notes:
        log.info("note: %s", note)
    manifest.model["tokenizer"] = copy_tokenizer(source.path, out_dir)  # tpugraph run's own tokenizer
    manifest.complete = True
    manifest.write(out_dir)
    (out_dir / PARTIAL_NAME).unlink(missing_ok=True)
    if progress:
        progress("done", len(specs), len(specs))
    return manifest


def _resolve_chain(options: ExportOptions):
    if options.passes is not None and not options.passes:
        return []
    from .passes import resolve_chain

    return resolve_chain(options.passes, options.skip_passes, options.pass_options)


def _naming(chain) -> str:
    """The I/O naming convention the chain leaves the segments in."""
    for p in chain:
        if p.name == "rename_kv_io":
            return str(p.options().get("convention", "llm-tpu"))
    return "llm-tpu"


def _apply_renames(entry: SegmentEntry, pass_results) -> None:
    """Keep the manifest's I/O names equal to the file's after a renaming pass."""
    from dataclasses import replace

    for result in pass_results:
        mapping = (getattr(result, "details", None) or {}).get("mapping")
        if not mapping:
            continue
        entry.inputs = [replace(t, name=mapping.get(t.name, t.name)) for t in entry.inputs]
        entry.outputs = [replace(t, name=mapping.get(t.name, t.name)) for t in entry.outputs]
        entry.extra["io_mapping"] = mapping
