"""Manifest + CompileOptions -> the ordered tool runs (model_transform, model_deploy, model_tool --combine)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..contract.manifest import Manifest, SegmentEntry, read_manifest
from ..contract.records import TextEnum
from ..contract.segments import EVAL_HEAD, SegmentKind
from ..errors import UsageError
from .options import (
    DEFAULT_Q_GROUP_SIZE,
    DYNAMIC_KINDS,
    DYNAMIC_PREFILL_KINDS,
    FLOAT_KINDS,
    HEAD_KINDS,
    HIGH_PRECISION_KINDS,
    IO_ALONE_KINDS,
    QUANT_INPUT_KINDS,
    QUANT_OUTPUT_KINDS,
    CompileOptions,
    resolve_auto,
)
from .tensor_parallel import NOT_SPLIT_NOTE, SPLIT_FORM_NOTE, check_split_form, tensor_split
from .vocab_sharing import VocabSharing, plan_sharing, rewritten_file

OUT_VAR = "{OUT}"  # stands for the output folder in a Step's arguments: "$OUT" in the script, the real path here
# model_transform.py + tpugraph's Top fusions, run by the tpu-mlir venv's python; copied into the work folder
TRANSFORM_DRIVER = "tpu_mlir_transform.py"


class StepAction(TextEnum):
    TRANSFORM = "transform"  # model_transform.py: ONNX -> top MLIR
    DEPLOY = "deploy"  # model_deploy.py: MLIR -> one segment's bmodel
    COMBINE = "combine"  # model_tool --combine: the segments' bmodels -> one


@dataclass(frozen=True)
class Step:
    """One tool run: ``argv`` and ``produces`` may start with OUT_VAR; ``cwd`` is relative to OUT."""

    segment: str  # "" for the combine step
    action: StepAction
    argv: tuple[str, ...]
    cwd: str
    produces: str  # the file the step must leave behind (relative to cwd unless it starts with OUT_VAR)
    checked: bool = False  # runs the tool's numerical compare
    # transform of a layer whose graph is another segment's with other weights: the runner may derive its
    # output from that segment's (mlir_reuse) instead of running the tool; the script always runs the tool
    reuse_from: str = ""

    def output_path(self, out_dir: Path) -> Path:
        if self.produces.startswith(OUT_VAR):
            return Path(self.produces.replace(OUT_VAR, str(out_dir), 1))
        return out_dir / self.cwd / self.produces


@dataclass
class CompilePlan:
    options: CompileOptions
    work_dir: str  # relative to OUT
    bmodel: str  # file name, written into OUT
    steps: list[Step]
    segments: list[str]
    command: str  # how to regenerate the script
    quant_choice: object = None  # quant_fidelity.CompileChoice when --quantize auto matched a quantized source
    vocab_sharing: VocabSharing | None = None  # the nets handed to tpu-mlir rewritten to share the vocabulary
    vocab_sharing_note: str = ""  # why the matrix is not shared (when the option asked for it)
    # compile --eval-head: lm_head_all's steps, from the file written into the work folder (compiler/eval_head.py)
    eval_head: str = ""
    tensor_parallel_note: str = ""  # --num-device N > 1: what the devices hold (tensor_parallel's notes)

    @property
    def script_name(self) -> str:
        return f"compile_{self.options.tag}.sh"

    @property
    def end_to_end(self) -> bool:
        """Whether the combined bmodel gets a greedy end-to-end check on the cmodel after the combine."""
        return self.options.check == "representative"


def bmodel_name(manifest: Manifest, options: CompileOptions) -> str:
    """`{model_type}_{quantize}_seq{SEQ}_{chip}_{N}dev.bmodel`, lowercase (LLM-TPU's naming plus the chip; `_{C}core`
    after `dev` for a compile for C > 1 cores)."""
    model_type = str(manifest.model.model_type or manifest.model.family or "model")
    model_type = re.sub(r"[^a-z0-9.-]+", "-", model_type.lower()).strip("-") or "model"
    seq = int(manifest.options.seq_length)
    dynamic = "_dynamic" if options.dynamic else ""
    evaluation = "_eval" if options.eval_head else ""
    cores = f"_{options.num_core}core" if options.num_core > 1 else ""
    return (f"{model_type}_{options.quantize}_seq{seq}_{options.chip}_{options.num_device}dev{cores}{dynamic}{evaluation}"
            ".bmodel").lower()


def _float_mode(quantize: str) -> str:
    return "bf16" if quantize.endswith("bf16") else "f16"


def deploy_flags(kind: SegmentKind, options: CompileOptions, float_weights: bool = False) -> list[str]:
    """model_deploy.py's quantization, device and I/O flags for one segment kind. ``float_weights``: the net's
    weights stay in the mode's float type (an lm_head sharing the embedding's matrix, as the embedding). The vit
    keeps the mode's float type too, whatever the language model's weights (options.FLOAT_KINDS)."""
    flags: list[str] = []
    if kind not in HEAD_KINDS:  # the heads: no --quantize, i.e. F32
        floating = kind in FLOAT_KINDS or float_weights
        quantize = _float_mode(options.quantize) if floating else options.quantize
        flags += ["--quantize", quantize.upper()]
        if quantize.startswith("w") and options.q_group_size:
            flags += ["--q_group_size", str(options.q_group_size)]
        if quantize.startswith("w") and options.q_symmetric:
            flags += ["--q_symmetric"]
    flags += ["--chip", options.chip]
    # tpu-mlir 1.30.2's device-parallel pass aborts on F32 nets ("Not supported quantization mode"), so the
    # heads stay single-device nets, as in LLM-TPU's multi-device scripts; model_tool combines both kinds.
    if options.num_device > 1 and kind not in HEAD_KINDS:
        flags += ["--num_device", str(options.num_device)]
    # the cores of one chip, as llm_convert passes them: every net but the F32 heads (single-core nets there too)
    if options.num_core > 1 and kind not in HEAD_KINDS:
        flags += ["--num_core", str(options.num_core)]
    if kind in QUANT_INPUT_KINDS:
        flags.append("--quant_input")
    if kind in QUANT_OUTPUT_KINDS:
        flags.append("--quant_output")
    if kind in HIGH_PRECISION_KINDS:
        flags.append("--high_precision")
    if kind in IO_ALONE_KINDS:
        flags += ["--addr_mode", "io_alone"]
    if kind in DYNAMIC_KINDS or (options.dynamic and kind in DYNAMIC_PREFILL_KINDS):
        flags.append("--dynamic")
    return flags


def check_dynamic_prefill(manifest: Manifest) -> None:
    """compile --dynamic: the runtime shortens a prefill net's inputs to the prompt's length, which it knows how to
    do for the contract's inputs only (input_states, position_ids, attention_mask, then a block_kv's full
    history). Raises UsageError for nets with other inputs (state layers, per-layer embeddings, shared KV) and for
    families whose blocks were not run compiled --dynamic (FamilySpec.dynamic_prefill)."""
    from ..source.families import FAMILIES, family_by_name

    name = str(manifest.model.family or "")
    try:
        checked = family_by_name(name).dynamic_prefill
    except KeyError:
        checked = False
    if not checked:
        ok = ", ".join(f.name for f in FAMILIES if f.dynamic_prefill)
        raise UsageError(f"--dynamic: the prefill nets of family '{name or 'unknown'}' are not known to run compiled "
                         f"--dynamic (checked on the cmodel: {ok}; tpu-mlir 1.30.2's dynamic code aborts on the "
                         "partly unfused blocks of gemma2, gemma3, glm4, phi3 and phi): compile without --dynamic")
    contract = {SegmentKind.BLOCK: ["input_states", "position_ids", "attention_mask"],
                SegmentKind.BLOCK_KV: ["input_states", "position_ids", "attention_mask", "history_k", "history_v"]}
    for entry in manifest.segments:
        if entry.kind in DYNAMIC_PREFILL_KINDS and [t.name for t in entry.inputs] != contract[entry.kind]:
            raise UsageError(f"--dynamic: {entry.name} takes ({', '.join(t.name for t in entry.inputs)}), not the "
                             f"contract's ({', '.join(contract[entry.kind])}); only those prefill nets can run at "
                             "the prompt's length (compile this output without --dynamic)")


def _test_input(out_dir: Path, entry: SegmentEntry) -> str | None:
    """The segment's test-data npz (relative to OUT) when the manifest notes one and it exists."""
    rel = entry.test_data.file if entry.test_data else None
    if rel and (out_dir / rel).is_file():
        return str(rel)
    return None


def presimplified(entry: SegmentEntry) -> bool:
    """Whether the segment went through tpugraph's constant folding and onnxsim (its passes say so): tpu-mlir's
    front end need not do both again."""
    ran = {p.get("name") for p in entry.passes}
    return {"fold_constants", "simplify"} <= ran


def representatives(manifest: Manifest) -> set[str]:
    """One segment per distinct graph structure: every segment whose graph was not reused from another
    (weight swapping notes ``graph_reused_from``), i.e. the vocabulary segments, the heads and the first layer
    of each layer structure."""
    return {e.name for e in manifest.segments if not e.graph_reused_from}


def plan_compile(out: str | Path, options: CompileOptions | None = None,
                 manifest: Manifest | None = None) -> CompilePlan:
    """Every tool run that compiles OUT's segments and combines them, in order. Deterministic for an OUT."""
    out_dir = Path(out)
    manifest = manifest or read_manifest(out_dir)
    options, quant_choice = resolve_auto(options or CompileOptions(), out_dir, manifest)
    options = options.check_options()
    if not manifest.complete:
        raise UsageError(f"{out_dir}/manifest.json is marked incomplete: finish the export first")
    if not manifest.segments:
        raise UsageError(f"{out_dir}/manifest.json lists no segments")
    if options.dynamic:
        check_dynamic_prefill(manifest)
    if options.num_device > 1:  # one line for a model whose heads have no even split (tensor_parallel.py)
        tensor_split(manifest.model.num_heads, manifest.model.num_kv_heads, options.num_device)
        if manifest.options.num_device > 1:  # the split form: what tpu-mlir itself can split
            check_split_form(manifest.model.num_heads, manifest.model.num_kv_heads, options.num_device)
    work = f"compile/{options.tag}"
    compared = {"all": {e.name for e in manifest.segments}, "representative": representatives(manifest),
                "none": set()}[options.check]
    sharing, sharing_note = plan_sharing(out_dir, manifest, options.num_device) if options.share_vocab else (None, "")
    rewritten = {sharing.lm_head, *sharing.last_layer} if sharing else set()
    if sharing and options.check == "representative":
        compared |= rewritten  # new structures: the tools compare them too
    entries = {e.name: e for e in manifest.segments}
    steps: list[Step] = []
    for entry in manifest.segments:
        name = entry.name
        cwd = f"{work}/{name}"
        test_input = None
        if name in compared:  # a rewritten last layer may take its template layer's inputs (the same shapes)
            template = entries.get(entry.graph_reused_from or "")
            test_input = _test_input(out_dir, entry) or (
                _test_input(out_dir, template) if name in rewritten and template else None)
        model_def = rewritten_file(work, name) if name in rewritten else entry.file
        dynamic = ["--dynamic-length"] if options.dynamic and entry.kind in DYNAMIC_PREFILL_KINDS else []
        transform = ["python3", f"{OUT_VAR}/{work}/{TRANSFORM_DRIVER}", *([] if options.fuse else ["--no-fuse"]), *dynamic,
                     *(["--skip-onnxsim"] if presimplified(entry) else []),
                     "--model_name", name, "--model_def", f"{OUT_VAR}/{model_def}", "--mlir", f"{name}.mlir"]
        float_weights = sharing is not None and name == sharing.lm_head
        deploy = ["model_deploy.py", "--mlir", f"{name}.mlir", *deploy_flags(entry.kind, options, float_weights),
                  "--model", f"{name}.bmodel"]
        if test_input:
            transform += ["--test_input", f"{OUT_VAR}/{test_input}", "--test_result", f"{name}_top_outputs.npz"]
            deploy += ["--test_input", f"{OUT_VAR}/{test_input}", "--test_reference", f"{name}_top_outputs.npz"]
        reuse = "" if test_input or name in rewritten else (entry.graph_reused_from or "")
        steps.append(Step(name, StepAction.TRANSFORM, tuple(transform), cwd, f"{name}.mlir", checked=bool(test_input),
                          reuse_from=reuse))
        steps.append(Step(name, StepAction.DEPLOY, tuple(deploy), cwd, f"{name}.bmodel", checked=bool(test_input)))
    nets = [s.name for s in manifest.segments]
    if options.eval_head:
        steps += _eval_head_steps(manifest, options, work, float_weights=sharing is not None)
        nets.append(EVAL_HEAD)
    bmodel = bmodel_name(manifest, options)
    combine = ["model_tool", "--combine", *(f"{name}/{name}.bmodel" for name in nets), "-o", f"{OUT_VAR}/{bmodel}"]
    steps.append(Step("", StepAction.COMBINE, tuple(combine), work, f"{OUT_VAR}/{bmodel}"))
    # A mode auto chose (with its symmetry) is regenerated by asking for auto again.
    command = f"tpugraph compile-script OUT --chip {options.chip} --quantize {'auto' if quant_choice else options.quantize}"
    if options.q_group_size and options.q_group_size != DEFAULT_Q_GROUP_SIZE and not quant_choice:
        command += f" --q-group-size {options.q_group_size}"
    if options.num_device != 1:
        command += f" --num-device {options.num_device}"
    if options.num_core != 1:
        command += f" --num-core {options.num_core}"
    if not options.fuse:
        command += " --no-fuse"
    if not options.share_vocab:
        command += " --no-share-vocab"
    if options.dynamic:
        command += " --dynamic"
    if options.eval_head:
        command += " --eval-head"
    if options.check == "none":
        command += " --no-check"
    elif options.check == "all":
        command += " --check all"
    return CompilePlan(options=options, work_dir=work, bmodel=bmodel, steps=steps,
                       segments=[s.name for s in manifest.segments], command=command, quant_choice=quant_choice,
                       vocab_sharing=sharing, vocab_sharing_note=sharing_note,
                       eval_head=EVAL_HEAD if options.eval_head else "",
                       tensor_parallel_note=_tensor_parallel_note(manifest, options))


def _tensor_parallel_note(manifest: Manifest, options: CompileOptions) -> str:
    if options.num_device == 1:
        return ""
    return SPLIT_FORM_NOTE if manifest.options.num_device > 1 else NOT_SPLIT_NOTE


def _eval_head_steps(manifest: Manifest, options: CompileOptions, work: str, float_weights: bool) -> list[Step]:
    """compile --eval-head: lm_head_all (compiler/eval_head.py) transformed and deployed as lm_head is (its
    quantization; float weights when the vocabulary matrix is shared), from the file the plan's writer puts in the
    work folder. No tool compare: it has no test data (tpugraph eval checks it against transformers)."""
    from .eval_head import lm_head_entry

    lm_head = lm_head_entry(manifest)  # an lm_head with logits to take over
    cwd = f"{work}/{EVAL_HEAD}"
    transform = ("python3", f"{OUT_VAR}/{work}/{TRANSFORM_DRIVER}", *([] if options.fuse else ["--no-fuse"]),
                 *(["--skip-onnxsim"] if presimplified(lm_head) else []), "--model_name", EVAL_HEAD, "--model_def", f"{OUT_VAR}/{rewritten_file(work, EVAL_HEAD)}",
                 "--mlir", f"{EVAL_HEAD}.mlir")
    deploy = ("model_deploy.py", "--mlir", f"{EVAL_HEAD}.mlir", *deploy_flags(SegmentKind.LM_HEAD, options, float_weights),
              "--model", f"{EVAL_HEAD}.bmodel")
    return [Step(EVAL_HEAD, StepAction.TRANSFORM, transform, cwd, f"{EVAL_HEAD}.mlir"),
            Step(EVAL_HEAD, StepAction.DEPLOY, deploy, cwd, f"{EVAL_HEAD}.bmodel")]
