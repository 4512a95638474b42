"""The tpugraph command line: thin typer commands, each calling one library function."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, TpugraphError
from .export.pipeline import EXTERNAL_DATA_MODES, FLOAT_DTYPES, INT_DTYPES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hugging Face causal LMs -> the ONNX segments Sophgo's tpu-mlir and LLM-TPU runtime expect.")
manifest_app = typer.Typer(no_args_is_help=True, help="Read and check OUT/manifest.json.")
passes_app = typer.Typer(no_args_is_help=True, help="List the graph passes, or run some of them on one file.")
app.add_typer(manifest_app, name="manifest")
app.add_typer(passes_app, name="passes")

_state = {"verbosity": 0}


def _echo(msg: str = "") -> None:
    if _state["verbosity"] >= 0:
        typer.echo(msg)


# Library argument -> the flag that sets it, where the two are not spelled alike.
FLAG_OF = {"greedy_in_lm_head": "--lm-head-greedy", "passes": "--passes", "skip_passes": "--skip-pass",
           "pass_options": "--option"}


def flag_of(option: str) -> str:
    return FLAG_OF.get(option, "--" + option.replace("_", "-"))


def _cli_text(err: TpugraphError) -> str:
    """A library error in the CLI's words: a UsageError about an argument names its flag."""
    option = getattr(err, "option", None)
    return f"{flag_of(option)} {err.problem}" if option else str(err)


def user_errors(fn):
    """Turn a TpugraphError into one line on stderr and its exit code; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TpugraphError as err:
            typer.echo(f"error: {_cli_text(err)}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished segments are kept; rerun the same command to finish", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except typer.Exit:
            raise
        except BrokenPipeError:  # the reader went away (`tpugraph families | head`): not an error of ours
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # Python's final flush of stdout must not fail again
            raise typer.Exit(0) from None
        except Exception as exc:  # a bug, not a user error: still one line unless asked for more
            if _state["verbosity"] >= 2:
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            typer.echo(f"error: internal error ({type(exc).__name__}: {first}); rerun with -vv for the traceback "
                       "and report it", err=True)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


@app.callback()
def main_options(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-vv for debug)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
) -> None:
    _state["verbosity"] = -1 if quiet else verbose
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@contextlib.contextmanager
def _progress_reporter(enabled: bool, what: str):
    """Progress callbacks: (name, index, total) per segment and (segment, pass, index, total) per pass. A rich
    bar with ETA over the segments and one over the current segment's passes on a terminal; plain lines per
    segment otherwise."""
    quiet = lambda *args: None  # noqa: E731
    if not enabled:
        yield quiet, quiet
        return
    if not sys.stderr.isatty():
        def plain(name: str, index: int, total: int) -> None:
            if name != "done":
                typer.echo(f"[{index + 1}/{total}] {name}", err=True)

        yield plain, quiet
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[what]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        tasks: dict[str, object] = {}

        def rich_progress(name: str, index: int, total: int) -> None:
            if "segments" not in tasks:
                tasks["segments"] = bar.add_task(name, total=total, what=what)
            bar.update(tasks["segments"], completed=index, description="done" if name == "done" else name)
            if name == "done" and "passes" in tasks:
                bar.remove_task(tasks.pop("passes"))

        def pass_progress(segment: str, pass_name: str, index: int, total: int) -> None:
            if "passes" not in tasks:
                tasks["passes"] = bar.add_task("", total=total, what="passes")
            bar.update(tasks["passes"], total=total, completed=index, description=f"  {segment}: {pass_name}")

        yield rich_progress, pass_progress


# Options and arguments several commands take, declared once.
OutFolder = Annotated[Path, typer.Argument(help="An output folder written by export-and-optimize.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
TpuMlirVenv = Annotated[Optional[Path], typer.Option(
    "--tpu-mlir", help="The tpu-mlir venv made by scripts/setup_tpu_mlir.sh (default: $TPUGRAPH_TPU_MLIR_VENV, "
                       "else the script's default location).")]
PassOptions = Annotated[Optional[list[str]], typer.Option(
    "--option", help="A pass option PASS.KEY=VALUE (repeatable), e.g. rename_kv_io.convention=optimum.")]
_QUANTIZE_HELP = ("Quantization: auto, f16, bf16, w8bf16, w4bf16, w8f16 or w4f16 (blocks and lm_head; the embedding keeps "
                  "the float type, the greedy/sample heads stay F32). auto (default): for a quantized source (GPTQ, AWQ, "
                  "GGUF...) the weight-only mode, group size and symmetry that keep its integers best; f16 otherwise.")
Chip = Annotated[str, typer.Option("--chip", help="Target chip: bm1684x or bm1688.")]
Quantize = Annotated[str, typer.Option("--quantize", help=_QUANTIZE_HELP)]
QGroupSize = Annotated[Optional[int], typer.Option(
    "--q-group-size", help="Group size of the weight-only modes (default 64 for w4*, per-channel for w8*).")]
NumDevice = Annotated[int, typer.Option("--num-device", help="Number of TPUs to split the model over (1, 2, 4, 8; bm1684x).")]
CompileCheck = Annotated[str, typer.Option(
    "--check", help="representative: tpu-mlir's numerical compares on one segment of each distinct structure "
    "(those with test data: export-and-optimize --with-test-data), then an end-to-end greedy check of the bmodel on "
    "the cmodel (verify --bmodel, a few tokens); all: the compares on every segment.")]
NoCheck = Annotated[bool, typer.Option("--no-check", help="No numerical check at all.")]
NoFuse = Annotated[bool, typer.Option(
    "--no-fuse", help="Hand tpu-mlir the graphs as its ONNX front end converts them: rotary embedding and attention "
    "not rewritten into top.Rope / top.FAttention (slower nets; for comparison and as a way around a fusion problem).")]
NoShareVocab = Annotated[bool, typer.Option(
    "--no-share-vocab", help="Keep the contract's cut in the bmodel: lm_head applies the final norm, so a tied "
    "vocabulary matrix is stored twice (by default the final norm moves into the last layer's nets for tpu-mlir and "
    "lm_head shares the embedding's coefficients).")]
Dynamic = Annotated[bool, typer.Option(
    "--dynamic", help="Compile the prefill nets (block_i, block_kv_i) with tpu-mlir's --dynamic: the runtime runs them "
    "at the prompt's real length instead of always L tokens (run/verify --bmodel then do). Writes "
    "..._dynamic.bmodel.")]


def _choices(values) -> str:
    return ", ".join(values)


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
    json_out: JsonOut = False,
) -> None:
    """Export MODEL into TPU-ready ONNX segments in OUT, run the pass chain on each, write OUT/manifest.json."""
    from .export.pipeline import ExportOptions, export_and_optimize
    from .passes import parse_pass_options

    opts = ExportOptions(seq_length=seq_length, int_dtype=int_dtype, dtype=dtype, passes=passes,
                         skip_passes=skip_pass or [], pass_options=parse_pass_options(option), naming=naming,
                         force=force, trust_remote_code=trust_remote_code, penalty_head=penalty_head,
                         greedy_in_lm_head=lm_head_greedy, sample_head=sample_head, lm_head_topk=lm_head_topk,
                         embedding_disk=embedding_disk, external_data=external_data, weight_swap=weight_swap,
                         jobs=jobs, with_test_data=with_test_data, max_input_length=max_input_length,
                         history_kv=history_kv)

    if gguf_file:
        from .source.checkpoint import resolve_model

        model = str(resolve_model(model, gguf_file).gguf_path)
    with _progress_reporter(enabled=_state["verbosity"] >= 0 and not json_out, what="segments") as (progress, passes):
        manifest = export_and_optimize(model, out, opts, progress=progress, pass_progress=passes)
    test_files = [e.extra["test_data"]["file"] for e in manifest.segments if "test_data" in e.extra]
    src = manifest.model["source"]
    if json_out:
        typer.echo(json.dumps({"out": str(out), "segments": len(manifest.segments), "random_weights": src["random_weights"],
                               "complete": manifest.complete, "test_data": test_files}))
        return
    _echo(f"wrote {len(manifest.segments)} segments and manifest.json to {out}")
    for note in manifest.notes:
        _echo(f"note: {note}")
    if test_files:
        _echo(f"wrote test inputs of {len(test_files)} segments to {out / 'test_data'} (used by compile-script and compile)")
    if src["random_weights"]:
        _echo(f"note: preset '{src['preset']}' has RANDOM weights: good for trying the toolchain, not for real text")


@app.command("verify")
@user_errors
def verify_cmd(
    out: OutFolder,
    prompt_length: int = typer.Option(8, "--prompt-length", help="Number of prompt tokens (random ids from --seed)."),
    new_tokens: int = typer.Option(8, "--new-tokens", help="Number of tokens to generate."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompt."),
    model: Optional[str] = typer.Option(None, "--model", help="Source model folder, if it moved since the export."),
    json_out: JsonOut = False,
    stream_reference: Optional[bool] = typer.Option(
        None, "--stream-reference/--full-reference",
        help="Stream the fp32 reference's layer weights from the safetensors (default: when the whole fp32 "
             "model would take over half the available memory, e.g. 7B on 24 GB)."),
    bmodel: Optional[Path] = typer.Option(None, "--bmodel", help="Test this combined bmodel (compiled from OUT) on tpu-mlir's cmodel chip simulator instead of OUT's ONNX segments."),
    tpu_mlir: TpuMlirVenv = None,
    turns: int = typer.Option(1, "--turns", help="Verify a conversation of this many turns (OUT's chat template when its tokenizer has one, else the prompt, each reply and a new random prompt): each turn is compared with transformers on the whole conversation so far, while the runtime keeps the KV cache and prefills only the new tokens (block_kv_i, --history-kv)."),
) -> None:
    """Drive OUT's segments (or, with --bmodel, the compiled bmodel on the cmodel) like the TPU runtime and compare
    tokens and logits with transformers' greedy generate."""
    from .proof.verify import verify

    report = verify(out, prompt_length=prompt_length, new_tokens=new_tokens, seed=seed, model_path=model,
                    stream_reference=stream_reference, bmodel=bmodel, tpu_mlir=tpu_mlir, turns=turns)
    if json_out:
        typer.echo(json.dumps(report.to_json()))
    else:
        _echo(f"prompt ({len(report.prompt)} tokens): {report.prompt}")
        _echo(f"{'step':>4}  {'hf':>7}  {'bmodel' if bmodel else 'onnx':>7}  {'cosine':>10}  {'max|diff|':>10}  {'rel':>9}  result")
        turn_of = {t.turn: t for t in report.turns}
        for s in report.steps:
            if s.step == 0 and s.turn in turn_of:
                t = turn_of[s.turn]
                _echo(f"turn {t.turn}: conversation of {t.prompt_tokens} tokens, {t.new_tokens} prefilled "
                      f"({t.prompt_tokens - t.new_tokens} from the KV cache)")
            numbers = (f"{s.cosine:>10.7f}  {s.max_abs_diff:>10.3e}  {s.rel_diff:>9.2e}" if s.logits_compared
                       else f"{'-':>10}  {'-':>10}  {'-':>9}")
            _echo(f"{s.step:>4}  {s.hf_token:>7}  {s.onnx_token:>7}  {numbers}  "
                  f"{('ok (near-tie)' if s.near_tie else 'ok') if s.ok else 'MISMATCH'}")
        min_cos, max_rel = report.thresholds
        logits = (f"min cosine {report.min_cosine:.7f} (>= {min_cos}); max rel diff {report.max_rel_diff:.2e} "
                  f"(<= {max_rel}); " if report.logits_compared else "")
        _echo(f"tokens equal: {report.tokens_equal}; {logits}{report.dtype} on {report.backend}"
              + ("; transformers' tokens fed back (teacher forcing)" if report.teacher_forced else "")
              + ("; reference layers streamed" if report.reference == "streamed" else "")
              + ("" if report.logits_compared else "; tokens only: the top-k lm_head returns no logits"))
        if report.mask_check is not None:
            m = report.mask_check
            _echo(f"mask {m['pattern']} (read as {m['value']:.4g}) instead of -10000: tokens {m['tokens']} "
                  f"{'equal' if report.mask_check_ok else 'DIFFER'}")
        typer.echo("PASS" if report.passed else "FAIL")
    if not report.passed:
        raise typer.Exit(1)


@app.command("run")
@user_errors
def run_cmd(
    out: OutFolder,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The prompt text (tokenized with OUT's own tokenizer)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as a user turn with the model's chat template."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Stop after this many new tokens (or at EOS, or when the window is full)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Token ids instead of text, e.g. 1,2,3 (works without a tokenizer)."),
    backend: str = typer.Option("onnx", "--backend", help="onnx: OUT's segments in onnxruntime; bmodel: a compiled bmodel on tpu-mlir's cmodel chip simulator."),
    bmodel: Optional[Path] = typer.Option(None, "--bmodel", help="The combined bmodel for --backend bmodel (default: the one .bmodel in OUT)."),
    tpu_mlir: TpuMlirVenv = None,
    sample: bool = typer.Option(False, "--sample", help="Draw each token from OUT's sample head (export with --sample-head) instead of greedy."),
    temperature: float = typer.Option(1.0, "--temperature", help="With --sample: softmax temperature (> 0)."),
    top_p: float = typer.Option(1.0, "--top-p", help="With --sample: nucleus mass to keep, in (0, 1]."),
    top_k: int = typer.Option(50, "--top-k", help="With --sample: the most likely tokens to keep, 1..50."),
    penalty: float = typer.Option(1.0, "--penalty", help="With --sample: repetition penalty on the tokens so far (1: none)."),
    seed: int = typer.Option(0, "--seed", help="With --sample: seed of the host's draws (the same seed gives the same tokens)."),
    json_out: JsonOut = False,
) -> None:
    """Generate text from OUT the way the TPU runtime drives the nets (greedy, or --sample), streaming tokens as they come."""
    from .runtime.sampling import SamplingParams
    from .runtime.text import parse_ids, run_prompt

    stream = None if json_out or _state["verbosity"] < 0 else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    result = run_prompt(out, prompt=prompt, prompt_ids=parse_ids(prompt_ids) if prompt_ids is not None else None,
                        chat=chat, max_new_tokens=max_new_tokens, backend=backend, bmodel=bmodel, venv=tpu_mlir,
                        on_text=stream, sampling=SamplingParams(temperature, top_p, top_k, penalty, seed) if sample else None)
    if json_out:
        typer.echo(json.dumps(result.to_json()))
        return
    if result.text is None and _state["verbosity"] < 0:
        typer.echo(" ".join(map(str, result.tokens)))
    _echo("")
    rate = f"{result.decode_tokens_per_second:.2f} tokens/s" if result.decode_tokens_per_second else "-"
    typer.echo(f"[{len(result.tokens)} tokens, stop: {result.stop}; prefill {result.prefill_seconds:.2f}s "
               f"({len(result.prompt_ids)} prompt tokens), decode {rate}; {result.backend}]", err=True)


@app.command("chat")
@user_errors
def chat_cmd(
    out: OutFolder,
    backend: str = typer.Option("onnx", "--backend", help="onnx: OUT's segments in onnxruntime; bmodel: a compiled bmodel on tpu-mlir's cmodel chip simulator."),
    bmodel: Optional[Path] = typer.Option(None, "--bmodel", help="The combined bmodel for --backend bmodel (default: the one .bmodel in OUT)."),
    tpu_mlir: TpuMlirVenv = None,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest reply (it also stops at EOS and when the window is full)."),
) -> None:
    """Chat with OUT turn by turn (its tokenizer's chat template). The conversation stays in the KV cache: with
    --history-kv each turn prefills only its new tokens. /reset starts over, /exit (or end of input) quits."""
    from .runtime.chat import ChatSession, ConversationFull

    session = ChatSession(out, backend=backend, bmodel=bmodel, venv=tpu_mlir, max_new_tokens=max_new_tokens)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"chatting with {out} (SEQ={session.seq}); /reset starts over, /exit quits", err=True)
    try:
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                session.reset()
                typer.echo("[conversation reset]", err=True)
                continue
            try:
                reply = session.ask(text, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
            except ConversationFull as full:
                typer.echo(f"sorry: {full}", err=True)
                continue
            typer.echo("")
            typer.echo(f"[{len(reply.tokens)} tokens, stop: {reply.stop}; conversation {reply.conversation_tokens} of "
                       f"{session.seq} tokens, {reply.prefilled} prefilled this turn; {reply.seconds:.2f}s]", err=True)
    finally:
        session.close()


@manifest_app.command("validate")
@user_errors
def manifest_validate_cmd(out: OutFolder) -> None:
    """Check that every file of OUT's manifest exists, its hash matches and its I/O shapes equal the manifest."""
    from .contract.manifest import read_manifest, validate

    problems = validate(out)
    for p in problems:
        typer.echo(f"MISMATCH {p}", err=True)
    if problems:
        typer.echo(f"{len(problems)} problem(s) in {out}", err=True)
        raise typer.Exit(7)
    _echo(f"ok: {len(read_manifest(out).segments)} segments match {out / 'manifest.json'}")


@passes_app.command("list")
@user_errors
def passes_list_cmd() -> None:
    """Name and one line for each registered pass; '*' marks the default chain, in its order."""
    from .passes import DEFAULT_CHAIN, PASSES

    for name in [*DEFAULT_CHAIN, *[n for n in PASSES if n not in DEFAULT_CHAIN]]:
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
    from .passes import parse_pass_options, run_passes_on_file

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


@app.command("inspect")
@user_errors
def inspect_cmd(
    path: Path = typer.Argument(..., help="An .onnx file, or an output folder with manifest.json."),
    json_out: JsonOut = False,
) -> None:
    """Show an ONNX file's I/O, ops, parameters, opset/IR and TPU problems; or the segment table of an OUT folder."""
    from .proof.inspection import inspect_onnx, inspect_output, is_output_folder

    if path.is_dir():
        if not is_output_folder(path):
            from .errors import UsageError

            raise UsageError(f"'{path}' is a folder without manifest.json: give an .onnx file or a tpugraph output")
        rows = inspect_output(path)
        if json_out:
            typer.echo(json.dumps(rows))
            return
        _echo(f"{'segment':<18} {'kind':<16} {'MB':>9} {'nodes':>6}  inputs -> outputs")
        for r in rows:
            _echo(f"{r['name']:<18} {r['kind']:<16} {r['bytes'] / 1e6:>9.2f} {str(r['nodes'] or '-'):>6}  "
                  f"{', '.join(r['inputs'])} -> {', '.join(r['outputs'])}")
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


def _compile_options(chip: str, quantize: str, q_group_size: Optional[int], num_device: int, check: str,
                     no_check: bool, no_fuse: bool = False, no_share_vocab: bool = False,
                     dynamic: bool = False):
    from .compiler import CompileOptions
    from .errors import UsageError

    try:
        return CompileOptions(chip=chip, quantize=quantize, q_group_size=q_group_size, num_device=num_device,
                              check="none" if no_check else check, fuse=not no_fuse,
                              share_vocab=not no_share_vocab, dynamic=dynamic).check_options()
    except UsageError as err:  # the library names what is wrong; the command line names its flag
        flag = {"chip": "--chip", "quantization": "--quantize", "a group size": "--q-group-size",
                "the group size": "--q-group-size", "the device count": "--num-device", "a device count": "--num-device",
                "check": "--check"}
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
    check: CompileCheck = "representative",
    no_check: NoCheck = False,
    no_fuse: NoFuse = False,
    no_share_vocab: NoShareVocab = False,
    dynamic: Dynamic = False,
    script: Optional[Path] = typer.Option(None, "--output", "-o", help="Script path (default OUT/compile_<quantize>_<chip>_<N>dev.sh)."),
) -> None:
    """Write a bash script with the tpu-mlir commands (model_transform, model_deploy, model_tool --combine) that compile OUT into one bmodel."""
    from .compiler import write_compile_script

    path = write_compile_script(out, _compile_options(chip, quantize, q_group_size, num_device, check, no_check, no_fuse,
                                                      no_share_vocab, dynamic), script)
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
    check: CompileCheck = "representative",
    no_check: NoCheck = False,
    no_fuse: NoFuse = False,
    no_share_vocab: NoShareVocab = False,
    dynamic: Dynamic = False,
    jobs: int = typer.Option(0, "--jobs", "-j", help="Segments to compile at once (each tool uses about one core; mind the memory of big blocks). 0: max(cores, 4), as llm_convert.py runs its deploys."),
    json_out: JsonOut = False,
) -> None:
    """Compile OUT's segments with tpu-mlir (transform, deploy, numerical compares) and combine them into one bmodel beside the manifest."""
    from .compiler import SegmentCompileError, compile_segments, format_table

    def progress(segment: str, action: str, index: int, total: int) -> None:
        if _state["verbosity"] >= 0 and not json_out and action != "done":
            typer.echo(f"[{index + 1}/{total}] {segment or 'all segments'}: {action}", err=True)

    try:
        report = compile_segments(out, tpu_mlir, _compile_options(chip, quantize, q_group_size, num_device, check, no_check,
                                                                  no_fuse, no_share_vocab, dynamic),
                                  progress=progress, jobs=jobs)
    except SegmentCompileError as err:
        if err.report and err.report.results and not json_out:
            typer.echo(format_table(err.report.results), err=True)
        raise
    if json_out:
        typer.echo(json.dumps(report.to_json()))
        return
    if report.plan.quant_choice is not None:
        _echo(f"quantize auto: {report.plan.quant_choice.summary()}")
    _echo(report.table())
    _echo(f"vocabulary matrix: {report.vocab_sharing}")
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
        raise typer.Exit(1)


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
    from .compiler.quant_fidelity import HALF_TYPES, choose_compile_mode
    from .errors import UsageError

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


@app.command("families")
@user_errors
def families_cmd(json_out: JsonOut = False) -> None:
    """List the supported model families: architectures, what each supports, minimum transformers."""
    from .source.families import FAMILIES

    if json_out:
        typer.echo(json.dumps([fam.to_json() for fam in FAMILIES]))
        return
    width = max([len("family")] + [len(fam.name) for fam in FAMILIES])
    _echo(f"{'family':<{width}} {'architectures':<22} {'transformers':<13} {'embeddings':<11} supports")
    for fam in FAMILIES:
        _echo(f"{fam.name:<{width}} {', '.join(fam.architectures):<22} {'>=' + fam.min_transformers:<13} "
              f"{fam.embeddings:<11} {fam.describe()}")


GLOBAL_FLAGS = {"-q", "--quiet", "-v", "-vv", "-vvv", "--verbose"}


def _global_flags_first(argv: list[str]) -> list[str]:
    """Accept -v/-q anywhere on the line (`tpugraph verify out -q`), as users type them."""
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    return flags + _sample_head_value([a for a in argv if a not in GLOBAL_FLAGS])


def _sample_head_value(argv: list[str]) -> list[str]:
    """`--sample-head` alone means `--sample-head current` (its value is optional: `--sample-head legacy`)."""
    from .contract.segments import SAMPLE_HEADS

    fixed = []
    for i, arg in enumerate(argv):
        fixed.append(arg)
        if arg == "--sample-head" and (i + 1 == len(argv) or argv[i + 1] not in SAMPLE_HEADS):
            fixed.append("current")
    return fixed


def main() -> None:
    try:
        app(args=_global_flags_first(sys.argv[1:]), prog_name="tpugraph")
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
