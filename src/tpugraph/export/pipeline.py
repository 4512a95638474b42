"""The main job as a library call: MODEL -> OUT with every segment exported, optimised and described.

Why this module is long: ExportOptions (every export option, documented where it is declared) and the manifest's
model facts (layers, states, vision) are read here, beside the one function that runs the job."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .. import __version__
from ..contract.manifest import MANIFEST_NAME, PARTIAL_NAME, ExportRun, Manifest
from ..contract.manifest_records import (
    Conventions,
    ExportStats,
    ModelRecord,
    PassChainEntry,
    RecordedOptions,
    ToolVersions,
    VisionRecord,
    read_quantization,
)
from ..contract.segments import KV_LAYOUT, MASK_VALUE, SAMPLE_HEADS, ContractDims, segment_specs
from ..errors import Interrupted, OutputError, UsageError
from ..source.checkpoint import ModelSource, load_config, model_facts, open_weights, resolve_model
from .committer import LARGE_MODEL_BYTES, Committer, UnitWriter  # noqa: F401 - re-exported
from .plan import EXTERNAL_MIN_BYTES, WorkUnit, plan_units, previous_entries  # noqa: F401 - re-exported
from .scheduler import ProgressFn, Scheduler

log = logging.getLogger(__name__)

EXTERNAL_DATA_MODES = ("auto", "always", "never")
INT_DTYPES = ("int32", "int64")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ExportOptions:
    seq_length: int = 512
    int_dtype: str = "int32"
    dtype: str = "float32"
    passes: list[str] | None = None  # None = the default chain; names may be comma-separated; ["none"] = no pass
    skip_passes: list[str] = field(default_factory=list)
    pass_options: dict[str, dict] = field(default_factory=dict)  # {"rename_kv_io": {"convention": "optimum"}}
    force: bool = False
    trust_remote_code: bool = False
    external_data: str = "auto"  # auto | always | never
    weight_swap: bool = True  # reuse one layer's optimised graph for the other layers of the same structure
    penalty_head: bool = False  # also export penalty_sample_head.onnx (CONTRACT.md)
    greedy_in_lm_head: bool = False  # lm_head -> (token, m_logits) and no greedy_head.onnx
    # The current LLM-TPU runtime's nets (CONTRACT.md, second table):
    sample_head: str | None = None  # current: sample_head.onnx; legacy: penalty_sample_head.onnx
    lm_head_topk: bool = False  # lm_head -> token [1,1] only, no greedy_head.onnx
    embedding_disk: bool = False  # no embedding nets: OUT/embedding.f32.bin, the rows the host gathers
    jobs: int = 0  # work units (vocabulary, each layer) built in parallel threads; 0: auto_jobs
    naming: str | None = None  # I/O naming convention (llm-tpu, optimum, genie): rename_kv_io's convention
    with_test_data: bool = False  # also write OUT/test_data/<segment>_input.npz (compare_inputs.write_test_data)
    max_input_length: int | None = None  # L: tokens of one prefill (embedding, block_i, block_kv_i); None = SEQ
    history_kv: bool = False  # also export block_kv_i: prefill on top of the KV history (multi-turn, chunks)
    max_pixels: int | None = None  # vision-language models: the vit segment's image size (None: the family's)
    lora: str | None = None  # a PEFT LoRA adapter folder merged into the weights (source/lora.py)
    lora_max_rank: int | None = None  # R: the block nets take each linear's LoRA A [R, in] and B [R, out] as inputs
    num_device: int = 1  # > 1: blocks written for tpu-mlir's device-parallel split (export/tensor_parallel_block.py)

    def check(self) -> None:
        """UsageError naming the field at fault (``option``), in the library's terms."""
        for option, value, allowed in (("external_data", self.external_data, EXTERNAL_DATA_MODES),
                                       ("int_dtype", self.int_dtype, INT_DTYPES),
                                       ("dtype", self.dtype, FLOAT_DTYPES),
                                       ("naming", self.naming, (None, *naming_conventions()))):
            if value not in allowed:
                shown = ", ".join(a for a in allowed if a is not None)
                raise UsageError(f"must be one of {shown} (got {value})", option=option)
        if self.seq_length < 1:
            raise UsageError(f"must be >= 1 (got {self.seq_length})", option="seq_length")
        if self.jobs < 0:
            raise UsageError(f"must be >= 0 (got {self.jobs}; 0: two threads for a model whose float32 weights "
                             "take at most an eighth of the memory, else one)", option="jobs")
        if self.sample_head not in (None, *SAMPLE_HEADS):
            raise UsageError(f"must be one of {', '.join(SAMPLE_HEADS)} (got {self.sample_head})", option="sample_head")
        if self.lm_head_topk and (self.sample_head or self.penalty_head):
            raise UsageError("cannot go with a sampling head: the top-k lm_head outputs the greedy token, "
                             "no logits to sample from (LLM-TPU builds it only without --do_sample)",
                             option="lm_head_topk")
        if self.lm_head_topk and self.greedy_in_lm_head:
            raise UsageError("and --lm-head-greedy are two layouts of the same lm_head: choose one",
                             option="lm_head_topk")
        if self.lora_max_rank is not None and self.lora_max_rank < 1:
            raise UsageError(f"must be >= 1 (got {self.lora_max_rank})", option="lora_max_rank")
        if self.lora_max_rank is not None and self.lora is not None:
            raise UsageError("and --lora do not go together: --lora merges one adapter into the weights, "
                             "--lora-max-rank leaves the adapter to the runtime (LoRA inputs): choose one",
                             option="lora_max_rank")
        if self.max_input_length is not None and not 1 <= self.max_input_length <= self.seq_length:
            raise UsageError(f"must be within 1..SEQ={self.seq_length}: the prefill nets take at most the "
                             f"decode window (got {self.max_input_length})", option="max_input_length")
        if self.num_device != 1:
            from ..compiler.options import NUM_DEVICES

            if self.num_device not in NUM_DEVICES:
                raise UsageError(f"must be one of {', '.join(map(str, NUM_DEVICES))} (got {self.num_device})",
                                 option="num_device")
            for option, used in (("history_kv", self.history_kv), ("lora_max_rank", self.lora_max_rank is not None),
                                 ("max_input_length", self.max_input_length not in (None, self.seq_length))):
                if used:  # the tensor-parallel block form is written for block_i and block_cache_i at SEQ only
                    raise UsageError("does not go with --num-device > 1 yet (the tensor-parallel block form covers "
                                     "the prefill and decode blocks at SEQ tokens)", option=option)

    def record(self) -> RecordedOptions:
        """The manifest's record of the options; the runtime options only where they differ from the default
        (so the manifest of a default export stays what it was)."""
        return RecordedOptions(
            seq_length=self.seq_length, dtype=self.dtype, int_dtype=self.int_dtype, external_data=self.external_data,
            penalty_head=self.penalty_head, greedy_in_lm_head=self.greedy_in_lm_head, sample_head=self.sample_head,
            lm_head_topk=self.lm_head_topk, embedding_disk=self.embedding_disk,
            max_input_length=self.max_input_length if self.max_input_length != self.seq_length else None,
            history_kv=self.history_kv, num_device=self.num_device)


def naming_conventions() -> tuple[str, ...]:
    from ..passes.rename_kv_io import CONVENTIONS

    return tuple(CONVENTIONS)


def tool_versions() -> ToolVersions:
    import onnx
    import torch
    import transformers

    versions = {"tpugraph": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "onnx": onnx.__version__}
    from ..passes import onnxsim_process as _onnxsim_process

    try:  # onnxsim is imported by the child process that runs it (onnxsim_process.py), not here
        versions["onnxsim"] = _onnxsim_process.version()
    except _onnxsim_process.OnnxsimChildError as exc:
        if exc.type_name not in ("ImportError", "ModuleNotFoundError"):
            raise
        versions["onnxsim"] = "not installed"
    return ToolVersions(**versions)


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


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def auto_jobs(weights, memory_bytes: int | None = None) -> int:
    """``--jobs 0``: two work units at once on a machine with two cores or more when the model's weights in float32
    take at most an eighth of the memory (each unit holds its layer's weights a few times over while it is traced
    and written), else one: a big model streams one layer at a time."""
    import math

    cores = os.cpu_count() or 1
    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return 1
    total = 4 * sum(math.prod(weights.shape_and_dtype(k)[0]) for k in weights.keys())
    return 2 if cores >= 2 and total * 8 <= memory_bytes else 1


def export_and_optimize(model: str, out: str | Path, options: ExportOptions | None = None,
                        progress: ProgressFn | None = None,
                        pass_progress: Callable[[str, str, int, int], None] | None = None) -> Manifest:
    """Export MODEL (folder or preset) into OUT: every segment of the contract, passed through the chain,
    then OUT/manifest.json, written last. Segments an earlier run finished with the same inputs are kept."""
    from ..passes import onnxsim_process
    from ..source.tokenizer import copy_tokenizer
    from .exporter import DEFAULT_OPSET
    from .factory import SegmentFactory
    from .model_parts import ModelParts
    from .notes import export_notes, split_form_note, unused_inputs_note
    from .resume import unit_fingerprint

    started = time.perf_counter()
    options = options or ExportOptions()
    options.check()
    if options.passes is None or any("simplify" in p for p in options.passes):
        onnxsim_process.prestart()
    out_dir = Path(out)
    source: ModelSource = resolve_model(model)
    config, family = load_config(source, options.trust_remote_code)
    facts = model_facts(config, family)
    refused = family.refused_option(options)
    if refused:
        raise UsageError(f"cannot be used with family {family.name}: {refused[1]}", option=refused[0])
    if facts.max_positions and options.seq_length > facts.max_positions:
        raise UsageError(f"{options.seq_length} exceeds the model's max_position_embeddings ({facts.max_positions})",
                         option="seq_length")
    if options.num_device > 1:  # one line for heads with no even split (compiler/tensor_parallel.py)
        from ..compiler.tensor_parallel import check_split_form

        check_split_form(facts.num_heads, facts.num_kv_heads, options.num_device)
        if family.vision is not None or family.per_layer_embedding is not None:
            raise UsageError(f"cannot be used with family {family.name} yet: the tensor-parallel block form is "
                             "written for text decoder layers", option="num_device")
    if options.max_pixels is not None and family.vision is None:
        raise UsageError(f"is for vision-language models; family {family.name} has no vision encoder",
                         option="max_pixels")
    weights = open_weights(source, config)  # plain, quantized (dequantized per tensor) or GGUF
    lora_dims = {}
    if options.lora_max_rank is not None:  # the block nets' LoRA inputs
        from ..source.lora import lora_dims as lora_input_dims

        lora_dims = lora_input_dims(config, family, options.lora_max_rank, layer_dims(config, family))
    adapter = None
    from ..source.lora import lora_inputs_record

    if options.lora is not None:  # merged at the weight source: every reader (streaming included) sees W + sBA
        from ..source.lora import read_adapter

        adapter = read_adapter(options.lora)
        weights = adapter.merged_into(weights)
    chain = _resolve_chain(options)
    prepare_output_dir(out_dir, options.force)
    previous = previous_entries(out_dir)
    # From here on OUT is being changed: no manifest.json until every segment is done again.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    dims = ContractDims(seq=options.seq_length, hidden=facts.hidden_size, kv_heads=facts.num_kv_heads,
                        head_dim=facts.head_dim, vocab=facts.vocab_size, layers=facts.num_layers,
                        int_dtype=options.int_dtype, max_input=options.max_input_length, **_state_dims(config, family),
                        **layer_dims(config, family), **vision_fields(config, family, options), **lora_dims)
    specs = segment_specs(dims, with_penalty_head=options.penalty_head, greedy_in_lm_head=options.greedy_in_lm_head,
                          sample_head=options.sample_head, lm_head_topk=options.lm_head_topk,
                          embedding_disk=options.embedding_disk, history_kv=options.history_kv)
    units = plan_units(specs, family, weights, DTYPE_BYTES[options.dtype], options.external_data)
    tools = tool_versions()
    manifest = Manifest(
        model=ModelRecord(**vars(facts), **_state_facts(dims), **layer_records(dims),
                          **vision_record(config, family, dims, source.path), source=source.record(),
                          source_quantization=read_quantization(weights.quantization) if weights.quantization else None,
                          lora=adapter.record("merged") if adapter else lora_inputs_record(lora_dims)),
        tools=tools,
        conventions=Conventions(kv_layout=KV_LAYOUT, mask_value=MASK_VALUE, opset=DEFAULT_OPSET, naming=_naming(chain),
                                int_dtype=options.int_dtype, float_dtype="float32", batch=1),
        options=replace(options.record(), max_pixels=dims.vision.max_pixels) if dims.vision else options.record(),
        pass_chain=[PassChainEntry(name=p.name, options=p.options()) for p in chain],
    )
    config_json = config.to_dict()
    work = Path(tempfile.mkdtemp(prefix=".tpugraph-work-", dir=out_dir))

    def make_factory() -> SegmentFactory:
        factory = SegmentFactory(ModelParts(config, family, weights, options.dtype, options.num_device), chain,
                                 options.seq_length,
                                 options.int_dtype, work, options.weight_swap)
        factory.on_pass = pass_progress
        return factory

    def fingerprint(unit: WorkUnit) -> str:
        return unit_fingerprint(unit.specs, unit.weight_prefixes, unit.data_file, weights, config_json,
                                manifest.options.to_json(), [p.to_json() for p in manifest.pass_chain],
                                tools.to_json())

    run = Scheduler(out_dir, previous, Committer(out_dir, manifest), progress, len(specs), make_factory)
    # torch's tracer and transformers warn about what an export does on purpose (legacy exporter, traced
    # control flow). Filters are set here, by the thread that owns the run, before the scheduler starts any
    # thread, and undone after they all ended: no thread changes them while others run.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run.run(units, fingerprint, options.jobs or auto_jobs(weights))
    except KeyboardInterrupt:  # the scheduler has let the commit in flight finish: the partial manifest is the state
        raise Interrupted(_interrupted_text(out_dir, len(manifest.segments), len(specs))) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    factory = run.factory
    if factory is not None:
        manifest.stats = ExportStats(segments_traced=factory.traced, segments_weight_swapped=factory.swapped)
    order = {spec.name: i for i, spec in enumerate(specs)}
    manifest.segments.sort(key=lambda e: order[e.name])
    unused = {e.name: e.unused_inputs for e in manifest.segments if e.unused_inputs}
    manifest.notes = export_notes(family, config, options.seq_length, options.dtype) + (
        [unused_inputs_note(unused)] if unused else []) + (
        [split_form_note(config)] if options.num_device > 1 and split_form_note(config) else [])
    for note in manifest.notes:
        log.info("note: %s", note)
    if options.embedding_disk:  # the rows the host gathers instead of running embedding nets
        from ..contract.embedding_table import write_table

        manifest.conventions.embedding_disk = write_table(ModelParts(config, family, weights, options.dtype), out_dir)
    manifest.model.tokenizer = copy_tokenizer(source, out_dir)  # tpugraph run's own tokenizer
    manifest.complete = True
    manifest.write(out_dir)
    (out_dir / PARTIAL_NAME).unlink(missing_ok=True)
    if options.with_test_data:
        from .compare_inputs import write_test_data

        write_test_data(out_dir, manifest)
    if progress:
        progress("done", len(specs), len(specs))
    manifest.last_run = ExportRun(tuple(run.kept), tuple(run.built), round(time.perf_counter() - started, 3))
    return manifest


def _interrupted_text(out_dir: Path, kept: int, total: int) -> str:
    if not kept:
        return f"no segment was finished, {out_dir} keeps none; rerun the same command to start again"
    return (f"{kept} of {total} segments are finished and kept in {out_dir}; rerun the same command to build the "
            f"other {total - kept}")


def _state_dims(config, family) -> dict:
    """ContractDims fields of a hybrid model's state layers (none for the others)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = family.state_layers(text)
    if not layers:
        return {}
    return {"state_layers": layers, "state_shapes": tuple(family.state_shapes(text).items())}


def _state_facts(dims: ContractDims) -> dict:
    """The manifest's record of the state layers (what the runtime feeds them); absent without them."""
    if not dims.state_layers:
        return {}
    return {"state_layers": list(dims.state_layers),
            "state_shapes": {name: list(shape) for name, shape in dims.state_shapes}}  # ModelRecord fields


def layer_dims(config, family) -> dict:
    """ContractDims fields of a family whose layers differ (per-layer KV shapes, shared KV, per-layer
    embeddings); empty for every other family."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    dims: dict = {}
    if family.per_layer_attention:
        dims["layer_kv"] = tuple(family.layer_kv_shape(text, i) for i in range(layers))
    sources = family.kv_sources(text)
    if any(s is not None for s in sources):
        dims["kv_from"] = tuple(sources)
    if family.per_layer_embedding is not None and family.per_layer_embedding.width(text):
        dims["per_layer"] = family.per_layer_embedding.width(text)
    return dims


def vision_fields(config, family, options: ExportOptions) -> dict:
    """ContractDims fields of a vision-language family (mrope position rows, the vit's sizes); empty otherwise.
    The largest image's tokens must fit in SEQ with room for a prompt."""
    fields: dict = {"position_rows": 3} if family.mrope else {}
    if family.vision is None:
        return fields
    from .vision import vision_dims

    vision = vision_dims(config, family, options.max_pixels)
    if vision.tokens + 2 >= options.seq_length:
        raise UsageError(f"{options.seq_length} leaves no room for a prompt beside the {vision.tokens} tokens of a "
                         f"max_pixels={vision.max_pixels} image (and its 2 bracket tokens): raise --seq-length or "
                         "lower --max-pixels", option="seq_length")
    return {**fields, "vision": vision}


def vision_record(config, family, dims: ContractDims, source_dir: Path | None = None) -> dict:
    """ModelRecord fields of what the host does around the vit (runtime/vision.py); none for text models.
    ``source_dir``: the model folder, whose tokenizer names the image brackets a config does not (InternVL)."""
    record: dict = {"mrope_section": list(family.mrope_section(config.get_text_config()))} if family.mrope else {}
    if dims.vision is None:
        return record
    from ..source.tokenizer import added_token_id
    from .vision import square_size

    v = config.vision_config
    # A vit without windows (Qwen3-VL): window_size 0, every block full attention.
    full = getattr(v, "fullatt_block_indexes", None)
    full = range(int(getattr(v, "depth", None) or v.num_hidden_layers)) if full is None else full
    merge = getattr(v, "spatial_merge_size", None) or int(round(dims.vision.merge_unit ** 0.5))  # Gemma 3: the pooling
    learned = {"num_position_embeddings": int(v.num_position_embeddings),
               "deepstack_visual_indexes": [int(i) for i in v.deepstack_visual_indexes]} \
        if dims.vision.kind == "qwen3_vl" else {}
    return {**record, "vision": VisionRecord(
        kind=family.vision.kind, max_pixels=dims.vision.max_pixels, patches=dims.vision.patches,
        patch_dim=dims.vision.patch_dim, tokens=dims.vision.tokens, patch_size=square_size(v.patch_size),
        temporal_patch_size=int(getattr(v, "temporal_patch_size", 1)), spatial_merge_size=int(merge),
        window_size=int(getattr(v, "window_size", 0) or 0), fullatt_block_indexes=[int(i) for i in full],
        token_ids=family.vision.token_ids(config, lambda text: added_token_id(source_dir, text)), **learned)}


def layer_records(dims: ContractDims) -> dict:
    """The manifest's model records of per-layer facts the runtime drives by: ``layers_kv`` (each layer's KV
    heads, head dim and the layer whose KV it reuses) and ``per_layer_embedding`` (P). Only when present."""
    if not (dims.layer_kv or dims.kv_from or dims.per_layer):
        return {}
    return {"layers_kv": dims.layer_records(), "per_layer_embedding": dims.per_layer}  # ModelRecord fields


def _resolve_chain(options: ExportOptions):
    names = options.passes
    if names is not None:
        names = [n.strip() for item in names for n in item.split(",") if n.strip()]
        if names in ([], ["none"]):
            return []
    from ..passes import resolve_chain

    pass_options = {name: dict(opts) for name, opts in options.pass_options.items()}
    if options.naming:
        pass_options.setdefault("rename_kv_io", {})["convention"] = options.naming
    return resolve_chain(names, options.skip_passes, pass_options)


def _naming(chain) -> str:
    """The I/O naming convention the chain leaves the segments in."""
    for p in chain:
        if p.name == "rename_kv_io":
            return str(p.options().get("convention", "llm-tpu"))
    return "llm-tpu"
