"""export-and-optimize, and the commands that look at what it wrote: manifest, passes, inspect, families."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..export.pipeline import EXTERNAL_DATA_MODES, FLOAT_DTYPES, INT_DTYPES
from .app import _echo, _state, app, manifest_app, passes_app, user_errors
from .progress import export_progress
from .options import JsonOut, OutFolder, PassOptions, _choices


@app.command("export-and-optimize")
@user_errors
def export_and_optimize_cmd(
    model: str = typer.Argument(..., help="A local Hugging Face model folder (config.json + *.safetensors, plain or GPTQ/AWQ/AutoRound-quantized), a .gguf file (or a folder holding one), or a preset name (e.g. tiny-llama)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the segments and manifest.json."),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="The .gguf file inside the MODEL folder to export (when it holds several, or config.json too)."),
    seq_length: int = typer.Option(512, "--seq-length", help="Static sequence length SEQ."),
    int_dtype: str = typer.Option("int32", "--int-dtype", help=f"Integer input dtype: {_choices(INT_DTYPES)}."),
    dtype: str = typer.Option("float32", "--dtype", help=f"Weight dtype of the exported segments: {_choices(FLOAT_DTYPES)} (segment inputs/outputs stay float32)."),
    passes: Optional[list[str]] = typer.Option(None, "--passes", help="Pass chain to run instead of the default (comma-separated; 'none' for no pass)."),
    skip_pass: Optional[list[str]] = typer.Option(None, "--skip-pass", help="Pass(es) to leave out of the chain."),
    option: PassOptions = None,
    naming: Optional[str] = typer.Option(None, "--naming", help="I/O naming convention: llm-tpu (default), optimum or genie (shortcut for --option rename_kv_io.convention=...)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder that is not a tpugraph output."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow models whose config needs remote code."),
    penalty_head: bool = typer.Option(False, "--penalty-head", help="Also export penalty_sample_head.onnx (repetition penalty, temperature, top-p; top-50 probs and tokens)."),
    lm_head_greedy: bool = typer.Option(False, "--lm-head-greedy", help="Take the greedy top-1 inside lm_head (outputs token, m_logits) and export no greedy_head."),
    sample_head: Optional[str] = typer.Option(None, "--sample-head", help="Also export the current LLM-TPU runtime's sample_head.onnx (repetition penalty, temperature, top-k, top-p; top-50 probs and token_idx); '--sample-head legacy': penalty_sample_head.onnx instead."),
    lm_head_topk: bool = typer.Option(False, "--lm-head-topk", help="lm_head returns the greedy token [1,1] only (the current runtime's top-k lm_head); no greedy_head."),
    embedding_disk: bool = typer.Option(False, "--embedding-disk", help="No embedding nets: the vocabulary rows go to OUT/embedding.f32.bin (compile writes embedding.bin in its float type) and the host gathers them."),
    external_data: str = typer.Option("auto", "--external-data", help=f"Weights in a shared NAME.data file per layer/vocabulary: {_choices(EXTERNAL_DATA_MODES)} (auto: when over 16 MB)."),
    weight_swap: bool = typer.Option(True, "--weight-swap/--no-weight-swap", help="Reuse one layer's optimised graph for the other layers of the same structure (checked against a full export of that layer)."),
    jobs: int = typer.Option(0, "--jobs", "-j", help="Work units (the vocabulary segments, each layer's pair) built in parallel threads; the output is the same whatever the number. 0: two when the model's float32 weights take at most an eighth of the memory, else one."),
    with_test_data: bool = typer.Option(False, "--with-test-data", help="Also write OUT/test_data/<segment>_input.npz: realistic inputs (a prompt driven through the segments) for tpu-mlir's numerical compares."),
    max_input_length: Optional[int] = typer.Option(None, "--max-input-length", help="L: tokens the prefill nets (embedding, block_i, block_kv_i) take, 1..SEQ (default SEQ); the decode nets keep SEQ. LLM-TPU's runtime reads L from embedding's input."),
    history_kv: bool = typer.Option(False, "--history-kv", help="Also export block_kv_i per layer: a prefill of up to L new tokens on top of the KV history (multi-turn chat keeps the cache between turns; a prompt longer than L is fed in chunks of L)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Vision-language models: the largest image (in pixels, a multiple of (patch x merge)^2, e.g. 784 for Qwen2.5-VL) the static vit segment takes; larger images are resized within it (default: the family's, 50176 = 224x224 for Qwen2.5-VL, 65536 = 256x256 for Qwen3-VL)."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) merged into the exported weights (W + scale * B @ A per targeted linear); the manifest records it."),
    lora_max_rank: Optional[int] = typer.Option(None, "--lora-max-rank", help="R: each block net also takes LoRA inputs, per linear of the layer A [R, in] and B [R, out] (named <linear>.lora_A/.lora_B), which the runtime fills with an adapter of rank <= R (zeros: the base model); run/verify --lora ADAPTER_DIR fill them."),
    num_device: int = typer.Option(1, "--num-device", help="Write the blocks for a compile over this many TPUs (compile --num-device N): rotary as mul/add and the mask straight from the input, the form tpu-mlir's device-parallel pass splits by heads and MLP columns (docs/explanation/tensor-parallel.md). Llama-like families."),
    json_out: JsonOut = False,
) -> None:
    """Export MODEL into TPU-ready ONNX segments in OUT, run the pass chain on each, write OUT/manifest.json."""
    from ..export.pipeline import ExportOptions, export_and_optimize
    from ..passes import parse_pass_options

    opts = ExportOptions(seq_length=seq_length, int_dtype=int_dtype, dtype=dtype, passes=passes,
                         skip_passes=skip_pass or [], pass_options=parse_pass_options(option), naming=naming,
                         force=force, trust_remote_code=trust_remote_code, penalty_head=penalty_head,
                         greedy_in_lm_head=lm_head_greedy, sample_head=sample_head, lm_head_topk=lm_head_topk,
                         embedding_disk=embedding_disk, external_data=external_data, weight_swap=weight_swap,
                         jobs=jobs, with_test_data=with_test_data, max_input_length=max_input_length,
                         history_kv=history_kv, max_pixels=max_pixels, lora=str(lora) if lora is not None else None,
                         lora_max_rank=lora_max_rank, num_device=num_device)

    if gguf_file:
        from ..source.checkpoint import resolve_model

        model = str(resolve_model(model, gguf_file).gguf_path)
    with export_progress(enabled=_state["verbosity"] >= 0 and not json_out, what="segments") as (progress, passes):
        manifest = export_and_optimize(model, out, opts, progress=progress, pass_progress=passes)
    test_files = [e.test_data.file for e in manifest.segments if e.test_data]
    src = manifest.model.source
    run = manifest.last_run
    if json_out:
        typer.echo(json.dumps({"out": str(out), "segments": len(manifest.segments), "kept": len(run.kept),
                               "built": len(run.built), "seconds": run.seconds, "random_weights": src.random_weights,
                               "complete": manifest.complete, "test_data": test_files}))
        return
    _echo(f"{run.summary()} in {out} ({run.seconds:.1f}s)")
    for note in manifest.notes:
        _echo(f"note: {note}")
    if test_files:
        _echo(f"wrote test inputs of {len(test_files)} segments to {out / 'test_data'} (used by compile-script and compile)")
    if src.random_weights:
        _echo(f"note: preset '{src.preset}' has RANDOM weights: good for trying the toolchain, not for real text")


@manifest_app.command("validate")
@user_errors
def manifest_validate_cmd(out: OutFolder, json_out: JsonOut = False) -> None:
    """Check that every file of OUT's manifest exists, its hash matches and its I/O shapes equal the manifest."""
    from ..contract.manifest import read_manifest, validate
    from ..errors import EXIT_INVALID_OUTPUT

    problems = validate(out)
    segments = len(read_manifest(out).segments)
    if json_out:
        typer.echo(json.dumps({"out": str(out), "segments": segments, "ok": not problems, "problems": problems}))
    else:
        for p in problems:
            typer.echo(f"MISMATCH {p}", err=True)
        if problems:
            typer.echo(f"error: {len(problems)} problem(s) in {out}", err=True)
        else:
            _echo(f"ok: {segments} segments match {out / 'manifest.json'}")
    if problems:
        raise typer.Exit(EXIT_INVALID_OUTPUT)


@passes_app.command("list")
@user_errors
def passes_list_cmd(json_out: JsonOut = False) -> None:
    """Name and one line for each registered pass; '*' marks the default chain, in its order."""
    from ..passes import DEFAULT_CHAIN, PASSES

    names = [*DEFAULT_CHAIN, *[n for n in PASSES if n not in DEFAULT_CHAIN]]
    if json_out:
        typer.echo(json.dumps([{"name": n, "default": n in DEFAULT_CHAIN, "summary": PASSES[n].summary} for n in names]))
        return
    for name in names:
        mark = "*" if name in DEFAULT_CHAIN else " "
        _echo(f"{mark} {name:<20} {PASSES[name].summary}")


@passes_app.command("run")
@user_errors
def passes_run_cmd(
    names: str = typer.Argument(..., help="Pass name(s), comma-separated, run in this order."),
    input_path: Path = typer.Argument(..., metavar="IN.onnx", help="The ONNX file to transform (left untouched)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the result."),
    check: bool = typer.Option(False, "--check", help="Run IN and OUT in onnxruntime on random inputs and compare."),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="Largest max-abs-diff per output that --check accepts."),
    option: PassOptions = None,
    json_out: JsonOut = False,
) -> None:
    """Run some passes on one ONNX file with the same code and options as the full chain (for debugging)."""
    from ..passes import parse_pass_options, run_passes_on_file

    report = run_passes_on_file(input_path, out, names, check=check, tolerance=tolerance,
                                options=parse_pass_options(option))
    if json_out:
        typer.echo(json.dumps(report.to_json()))
        return
    for r in report.results:
        _echo(f"{r.name:<20} {'modified' if r.modified else 'unchanged':<10} nodes {r.nodes_before} -> "
              f"{r.nodes_after}  {r.seconds:.2f}s  {json.dumps(r.details, default=str)[:120]}")
    if report.max_abs_diff is not None:
        for name, diff in report.max_abs_diff.items():
            _echo(f"check {name:<24} max|diff| {diff:.3e} (tolerance {report.tolerance:g})")
    _echo(f"wrote {out}")


def _tensors(specs: list[dict]) -> str:
    return ", ".join(f"{t['name']}{t['shape']}" for t in specs)


@app.command("inspect")
@user_errors
def inspect_cmd(
    path: Path = typer.Argument(..., help="An .onnx file, or an output folder with manifest.json."),
    json_out: JsonOut = False,
) -> None:
    """Show an ONNX file's I/O, ops, parameters, opset/IR and TPU problems; or the segment table of an OUT folder."""
    from ..proof.inspection import inspect_onnx, inspect_output, is_output_folder

    if path.is_dir():
        if not is_output_folder(path):
            from ..errors import OutputError

            raise OutputError(f"'{path}' has no manifest.json: not a tpugraph output (give one, or an .onnx file)")
        rows = inspect_output(path)
        if json_out:
            typer.echo(json.dumps(rows))
            return
        _echo(f"{'segment':<18} {'kind':<16} {'MB':>9} {'nodes':>6}  inputs -> outputs")
        for r in rows:
            _echo(f"{r['name']:<18} {r['kind']:<16} {r['bytes'] / 1e6:>9.2f} {str(r['nodes'] or '-'):>6}  "
                  f"{_tensors(r['inputs'])} -> {_tensors(r['outputs'])}")
        return
    summary = inspect_onnx(path)
    if json_out:
        typer.echo(json.dumps(summary.to_json()))
        return
    _echo(f"{summary.path}: opset {summary.opset}, IR version {summary.ir_version}, {summary.nodes} nodes, "
          f"{summary.parameters:,} parameters ({summary.parameter_bytes / 1e6:.2f} MB"
          f"{', external data' if summary.external_data else ''})")
    for label, tensors in (("input", summary.inputs), ("output", summary.outputs)):
        for t in tensors:
            _echo(f"  {label:<6} {t.name:<20} {str(list(t.shape)):<24} {t.dtype}")
    _echo("  ops: " + ", ".join(f"{op}x{n}" for op, n in summary.op_histogram.items()))
    _echo("  dynamic dims: " + (", ".join(summary.dynamic_dims) if summary.dynamic_dims else "none"))
    _echo("  ops tpu-mlir 1.30 does not support: " + (", ".join(summary.unsupported_ops) or "none"))


@app.command("families")
@user_errors
def families_cmd(json_out: JsonOut = False) -> None:
    """List the supported model families: architectures, what each supports, minimum transformers."""
    from ..source.families import FAMILIES

    if json_out:
        typer.echo(json.dumps([fam.to_json() for fam in FAMILIES]))
        return
    import shutil
    import textwrap

    columns = max(60, shutil.get_terminal_size((100, 24)).columns)
    width = max([len("family")] + [len(fam.name) for fam in FAMILIES])
    indent = " " * (width + 2)
    _echo(f"{'family':<{width}}  {'transformers':<13}{'embeddings':<11}architectures")
    _echo(f"{'':<{width}}  supports")
    for fam in FAMILIES:
        head = f"{fam.name:<{width}}  {'>=' + fam.min_transformers:<13}{fam.embeddings:<11}"
        for line in textwrap.wrap(", ".join(fam.architectures), columns - 1, initial_indent=head,
                                  subsequent_indent=" " * len(head)):
            _echo(line)
        for line in textwrap.wrap(fam.describe(), columns - 1, initial_indent=indent, subsequent_indent=indent):
            _echo(line)
