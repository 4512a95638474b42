"""compile-script, compile and quant-fidelity: OUT -> a bmodel with tpu-mlir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import EXIT_CHECK_FAILED, EXIT_USAGE
from .app import _echo, _state, app, user_errors
from .progress import compile_progress
from .options import (
    Chip,
    CompileCheck,
    DeviceMemory,
    DryRun,
    Dynamic,
    EvalHead,
    JsonOut,
    NoCheck,
    NoFuse,
    NoShareVocab,
    NumCore,
    NumDevice,
    OutFolder,
    QGroupSize,
    Quantize,
    TpuMlirVenv,
)


def _compile_options(chip: str, quantize: str, q_group_size: Optional[int], num_device: int, check: str,
                     no_check: bool, no_fuse: bool = False, no_share_vocab: bool = False,
                     dynamic: bool = False, eval_head: bool = False, device_memory: Optional[float] = None,
                     num_core: int = 1):
    from ..compiler import CompileOptions
    from ..errors import UsageError

    memory = None if device_memory is None else int(device_memory * (1 << 30))
    try:
        return CompileOptions(chip=chip, quantize=quantize, q_group_size=q_group_size, num_device=num_device,
                              check="none" if no_check else check, fuse=not no_fuse,
                              share_vocab=not no_share_vocab, dynamic=dynamic, eval_head=eval_head,
                              device_memory=memory, num_core=num_core).check_options()
    except UsageError as err:  # the library names what is wrong; the command line names its flag
        flag = {"chip": "--chip", "quantization": "--quantize", "a group size": "--q-group-size",
                "the group size": "--q-group-size", "the device count": "--num-device", "a device count": "--num-device",
                "the core count": "--num-core",
                "check": "--check", "the device memory": "--device-memory"}
        for words, name in flag.items():
            if str(err).startswith(words + " "):
                raise UsageError(f"{name}: {err}") from None
        raise


@app.command("compile-script")
@user_errors
def compile_script_cmd(
    out: OutFolder,
    chip: Chip = "bm1684x",
    quantize: Quantize = "auto",
    q_group_size: QGroupSize = None,
    num_device: NumDevice = 1,
    num_core: NumCore = 1,
    check: CompileCheck = "representative",
    no_check: NoCheck = False,
    no_fuse: NoFuse = False,
    no_share_vocab: NoShareVocab = False,
    dynamic: Dynamic = False,
    eval_head: EvalHead = False,
    script: Optional[Path] = typer.Option(None, "--output", "-o", help="Script path (default OUT/compile_<quantize>_<chip>_<N>dev.sh)."),
    json_out: JsonOut = False,
) -> None:
    """Write a bash script with the tpu-mlir commands (model_transform, model_deploy, model_tool --combine) that compile OUT into one bmodel."""
    from ..compiler import write_compile_script

    path = write_compile_script(out, _compile_options(chip, quantize, q_group_size, num_device, check, no_check, no_fuse,
                                                      no_share_vocab, dynamic, eval_head, num_core=num_core), script)
    if json_out:
        typer.echo(json.dumps({"script": str(path)}))
        return
    _echo(f"wrote {path}")
    _echo(f'run it with tpu-mlir on PATH: source "$(scripts/setup_tpu_mlir.sh)/bin/activate" && bash {path} {out}')


@app.command("compile")
@user_errors
def compile_cmd(
    out: OutFolder,
    tpu_mlir: TpuMlirVenv = None,
    chip: Chip = "bm1684x",
    quantize: Quantize = "auto",
    q_group_size: QGroupSize = None,
    num_device: NumDevice = 1,
    num_core: NumCore = 1,
    check: CompileCheck = "representative",
    no_check: NoCheck = False,
    no_fuse: NoFuse = False,
    no_share_vocab: NoShareVocab = False,
    dynamic: Dynamic = False,
    eval_head: EvalHead = False,
    device_memory: DeviceMemory = None,
    dry_run: DryRun = False,
    jobs: int = typer.Option(0, "--jobs", "-j", help="Segments to compile at once (each tool uses about one core; mind the memory of big blocks). 0: max(cores, 4), as llm_convert.py runs its deploys (with --executor ray: the cluster's CPUs)."),
    executor: str = typer.Option("local", "--executor", help="Where the tools run: local (here), or ray (each tool a Ray task on a cluster: the extra tpugraph[ray]). The same plan and outputs."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="The Ray cluster to join (default: a local cluster started for the compile)."),
    max_ppl_increase: Optional[float] = typer.Option(None, "--max-ppl-increase", help="With --quantize auto: measure the modes from the cheapest (W4BF16 g128, W4BF16 g64, W8BF16, BF16), each compiled with the evaluation head and scored on the cmodel against transformers (tpugraph eval --bmodel, the built-in text), and compile the first whose perplexity is at most this many percent above transformers'. Slow: minutes per mode on the cmodel."),
    ppl_windows: int = typer.Option(2, "--ppl-windows", help="With --max-ppl-increase: windows of the built-in text scored per mode (L tokens each)."),
    json_out: JsonOut = False,
) -> None:
    """Compile OUT's segments with tpu-mlir (transform, deploy, numerical compares) and combine them into one bmodel beside the manifest."""
    from ..compiler import SegmentCompileError, compile_segments, format_table

    options = _compile_options(chip, quantize, q_group_size, num_device, check, no_check, no_fuse, no_share_vocab,
                               dynamic, eval_head, device_memory, num_core)
    if dry_run:
        _dry_run(out, options, json_out)
        return
    ppl_choice = None
    if max_ppl_increase is not None:
        ppl_choice = _choose_by_perplexity(out, tpu_mlir, options, max_ppl_increase, ppl_windows, jobs, json_out)
        options = _compile_options(chip, ppl_choice.chosen.quantize, ppl_choice.chosen.q_group_size, num_device, check,
                                   no_check, no_fuse, no_share_vocab, dynamic, eval_head, device_memory, num_core)
    try:
        with compile_progress(enabled=_state["verbosity"] >= 0 and not json_out) as progress:
            report = compile_segments(out, tpu_mlir, options, progress=progress, jobs=jobs, executor=executor,
                                      ray_address=ray_address)
    except SegmentCompileError as err:
        if err.report and err.report.results and not json_out:
            typer.echo(format_table(err.report.results), err=True)
        raise
    if json_out:
        typer.echo(json.dumps(report.to_json() | ({"ppl_choice": ppl_choice.to_json()} if ppl_choice else {})))
        return
    if report.plan.quant_choice is not None:
        _echo(f"quantize auto: {report.plan.quant_choice.summary()}")
    _echo(report.table())
    _echo(f"vocabulary matrix: {report.vocab_sharing}")
    for split in report.device_splits:  # --num-device N > 1: measured from the bmodel (compiler/device_split.py)
        _echo(f"devices: {split.line()}")
    proof = report.device_proof
    if proof is not None:
        worst = min((c.cosine for c in proof.checks), default=float("nan"))
        _echo(f"per device on the cmodel: {len(proof.nets_run)} device parts chained against the whole blocks, min "
              f"cosine {worst:.6f} ({report.end_to_end_seconds:.0f}s): {'PASS' if proof.passed else 'FAIL'}")
    elif report.device_splits and report.plan.end_to_end:
        _echo("per device on the cmodel: not checked (no well-formed split; the cmodel cannot launch a cascade net)")
    unchecked = [r.segment for r in report.results if not r.checked]
    if unchecked and report.plan.options.check != "none":
        reason = ("same structure as a compared segment, or no test data (export with --with-test-data)"
                  if report.plan.options.check == "representative" else "no test data (export with --with-test-data)")
        _echo(f"note: compiled without the tools' compares: {', '.join(unchecked)} ({reason})")
    if report.transforms_derived or report.deploys_derived:
        _echo(f"reused: {len(report.transforms_derived)} layers' MLIR from their template layer's, "
              f"{len(report.deploys_derived)} layers' bmodel written from a proven deploy of the same net"
              + "".join(f"; {note}" for note in report.deploy_reuse_notes))
    e2e = report.end_to_end
    if e2e is not None:
        _echo(f"end to end on the cmodel: {len(e2e.steps)} greedy tokens {'equal' if e2e.tokens_equal else 'DIFFER'} "
              f"(transformers {e2e.hf_tokens}, bmodel {e2e.onnx_tokens}), min logits cosine {e2e.min_cosine:.6f} "
              f"({report.end_to_end_seconds:.0f}s): {'PASS' if e2e.passed else 'FAIL'}")
    _echo(f"wrote {report.bmodel} ({report.seconds:.0f}s)")
    if report.embedding_table:
        _echo(f"wrote {report.embedding_table} (the vocabulary rows the host gathers: --embedding-disk)")
    if not report.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _choose_by_perplexity(out, tpu_mlir, options, max_increase: float, windows: int, jobs: int, json_out: bool):
    """compile --quantize auto --max-ppl-increase X: the cheapest mode within X (compiler/ppl_choice.py), with its
    measured table printed; a one-line error (exit 1) when none is within."""
    from ..compiler.ppl_choice import choose_by_perplexity, cmodel_measure
    from ..errors import CheckFailedError, UsageError

    if options.quantize != "auto":
        raise UsageError(f"--max-ppl-increase chooses the mode itself: use it with --quantize auto, not {options.quantize}")
    if windows < 1:
        raise UsageError(f"--ppl-windows must be >= 1 (got {windows})")
    from ..contract.manifest import read_manifest

    hidden = int(read_manifest(out).model.hidden_size)
    choice = choose_by_perplexity(max_increase, cmodel_measure(out, tpu_mlir, options.chip, windows, jobs=jobs),
                                  hidden_size=hidden)
    if not json_out:
        _echo(choice.table())
        _echo(f"quantize auto: {choice.summary()}")
    if choice.chosen is None:
        raise CheckFailedError(choice.summary())
    return choice


def _dry_run(out: Path, options, json_out: bool) -> None:
    from ..compiler.memory_plan import check_fits
    from ..compiler.runner import preview_compile

    plan, memory, why = preview_compile(out, options)
    if json_out:  # one object; a plan that does not fit says so in it ("fits": false) and in the exit code
        typer.echo(json.dumps({"bmodel": plan.bmodel, "steps": [" ".join(s.argv) for s in plan.steps],
                               "memory": memory.to_json() if memory else None, "memory_unavailable": why or None}))
        if memory is not None and not memory.fits:
            raise typer.Exit(EXIT_USAGE)
        return
    for line in memory.lines() if memory else [f"memory plan: unavailable ({why})"]:
        _echo(line)
    _echo(f"{len(plan.steps)} tool runs for {len(plan.segments)} segments -> {plan.bmodel} "
          f"(tpugraph compile-script writes them as bash)")
    if memory is not None:
        check_fits(memory)


@app.command("quant-fidelity")
@user_errors
def quant_fidelity_cmd(
    out: Path = typer.Argument(..., help="An output folder exported from a quantized model (GPTQ, AWQ, AutoRound, compressed-tensors, GGUF)."),
    model: Optional[str] = typer.Option(None, "--model", help="The source model, if it moved since the export."),
    layers: int = typer.Option(4, "--layers", help="Decoder layers to measure, spread over the model (0: all)."),
    half: str = typer.Option("f16", "--half", help="Half type of the deploy's scales: f16 or bf16."),
    json_out: JsonOut = False,
) -> None:
    """The W4/W8 compile mode that keeps a quantized source's integers best (bits, group size, asymmetric or
    --q_symmetric), with the share of groups tpu-mlir's re-quantization reproduces exactly and its extra
    weight error relative to the checkpoint's own quantization error."""
    from ..compiler.quant_fidelity import HALF_TYPES, choose_compile_mode
    from ..errors import UsageError

    if half not in HALF_TYPES:
        raise UsageError(f"--half must be one of {', '.join(HALF_TYPES)} (got {half})")
    choice = choose_compile_mode(out, model, sample_layers=layers or None, half=half)
    if choice is None:
        if json_out:
            typer.echo(json.dumps(None))
        else:
            _echo("the source was not quantized: compile with the usual modes")
        return
    if json_out:
        typer.echo(json.dumps(choice.to_json()))
        return
    _echo(choice.summary())
    for note in choice.notes:
        _echo(f"note: {note}")
    _echo("compile with: " + " ".join(choice.compile_args())
          + (" plus model_deploy's --q_symmetric" if choice.q_symmetric else ""))
