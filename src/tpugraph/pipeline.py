"""The main job as a library call: MODEL -> OUT with every segment exported, optimised and described."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
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

    def check(self) -> None:
        if self.seq_length < 1:
            raise UsageError(f"--seq-length must be >= 1 (got {self.seq_length})")
        if self.int_dtype not in INT_DTYPES:
            raise UsageError(f"--int-dtype must be one of {', '.join(INT_DTYPES)} (got {self.int_dtype})")
        if self.dtype not in FLOAT_DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)} (got {self.dtype})")
        if self.dtype != "float32":
            raise UsageError(f"--dtype {self.dtype} is not supported yet: segments are exported in float32")


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


def save_model_atomic(model, out_dir: Path, filename: str) -> list[dict]:
    """Write an ONNX model (and its external data, when big) into a staging folder inside OUT, then rename
    the data first and the .onnx last, so a file under its final name is always complete.

    Returns the external-data files written (names relative to OUT) for the manifest.
    """
    import onnx

    stage = Path(tempfile.mkdtemp(prefix=f".tpugraph-stage-{filename}-", dir=out_dir))
    external: list[dict] = []
    try:
        big = not _fits_protobuf(model)
        if big:
            data_name = f"{filename}.data"
            onnx.save_model(model, str(stage / filename), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(stage / data_name, out_dir / data_name)
            external.append({"file": data_name})
        else:
            onnx.save_model(model, str(stage / filename))
        os.replace(stage / filename, out_dir / filename)
    except OSError as exc:
        raise OutputError(f"cannot write {out_dir / filename}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return external


def _fits_protobuf(model) -> bool:
    try:
        return model.ByteSize() <= LARGE_MODEL_BYTES
    except Exception:  # protobuf refuses to size messages past 2 GB
        return False


ProgressFn = Callable[[str, int, int], None]


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


def _still_valid(entry: SegmentEntry, out_dir: Path, fingerprint: str) -> bool:
    if entry.extra.get("fingerprint") != fingerprint:
        return False
    files = [(entry.file, entry.size, entry.sha256)] + [(e["file"], e.get("size"), e.get("sha256")) for e in entry.external_data]
    for name, size, digest in files:
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != size or sha256_file(path) != digest:
            return False
    return True


def export_and_optimize(model: str, out: str | Path, options: ExportOptions | None = None,
                        progress: ProgressFn | None = None) -> Manifest:
    """Export MODEL (folder or preset) into OUT: every segment of the contract, passed through the chain,
    then OUT/manifest.json, written last. Segments an earlier run finished with the same inputs are kept."""
    from .export.exporter import DEFAULT_OPSET, ModelParts, export_segment
    from .resume import segment_fingerprint

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
    specs = segment_specs(dims)
    tools = tool_versions()
    manifest = Manifest(
        model={**facts.to_json(), "source": source.to_json()},
        tools=tools,
        conventions={"kv_layout": KV_LAYOUT, "mask_value": MASK_VALUE, "opset": DEFAULT_OPSET,
                     "naming": _naming(chain), "int_dtype": options.int_dtype, "float_dtype": "float32",
                     "batch": 1},
        options={"seq_length": options.seq_length, "dtype": options.dtype, "int_dtype": options.int_dtype},
        pass_chain=[{"name": p.name, "options": p.options()} for p in chain],
    )
    config_json = config.to_dict()
    parts = None
    work = Path(tempfile.mkdtemp(prefix=".tpugraph-work-", dir=out_dir))
    try:
        for index, spec in enumerate(specs):
            if progress:
                progress(spec.name, index, len(specs))
            fingerprint = segment_fingerprint(spec, family, weights, config_json, manifest.options,
                                              manifest.pass_chain, tools)
            prev = previous.get(spec.name)
            if prev is not None and _still_valid(prev, out_dir, fingerprint):
                log.info("%s: unchanged since the last run, kept", spec.name)
                prev.extra["reused"] = True
                manifest.segments.append(prev)
                manifest.write(out_dir, PARTIAL_NAME)
                continue
            t0 = time.perf_counter()
            parts = parts or ModelParts(config, family, weights, options.dtype)
            onnx_model = export_segment(parts, spec, options.seq_length, options.int_dtype, work)
            onnx_model, pass_results = _run_chain(onnx_model, chain, spec, work) if chain else (onnx_model, [])
            entry = SegmentEntry(name=spec.name, kind=spec.kind.value, layer=spec.layer, file=spec.filename,
                                 inputs=list(spec.inputs), outputs=list(spec.outputs))
            _apply_renames(entry, pass_results)
            entry.external_data = save_model_atomic(onnx_model, out_dir, spec.filename)
            del onnx_model
            entry.passes = [r.to_json() for r in pass_results]
            entry.extra["fingerprint"] = fingerprint
            entry.extra["export_seconds"] = round(time.perf_counter() - t0, 3)
            entry.record_files(out_dir)
            manifest.segments.append(entry)
            manifest.write(out_dir, PARTIAL_NAME)
            log.info("%s done (%.2fs)", spec.name, time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
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


def _run_chain(model, chain, spec: SegmentSpec, work: Path):
    from .passes import PassContext, run_chain

    ctx = PassContext(segment=spec.name, shapes=spec.shapes(), work_dir=work)
    if hasattr(ctx, "layer"):
        ctx.layer = spec.layer
    if hasattr(ctx, "kind"):
        ctx.kind = spec.kind.value
    return run_chain(model, chain, ctx)


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


def load_output(out: str | Path) -> Manifest:
    return read_manifest(Path(out))
