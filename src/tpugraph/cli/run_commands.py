"""verify, run and chat: OUT (or its bmodel) driven the way the TPU runtime drives it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import EXIT_CHECK_FAILED
from .app import _echo, _state, app, user_errors
from .options import Backend, BmodelFile, JsonOut, OutFolder, TpuMlirVenv


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
    image: Optional[List[Path]] = typer.Option(None, "--image", help="A vision-language output: verify with this image in front of the prompt (default: a built-in synthetic picture); given more than once, with each image in turn; the vit output is also compared with transformers' vision features."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="A PEFT LoRA adapter folder: the reference is transformers with it loaded by PEFT; an export with --lora-max-rank is fed its A and B (without --lora: zeros, the base model). An export with an adapter merged is compared with that adapter by default."),
    turns: int = typer.Option(1, "--turns", help="Verify a conversation of this many turns (OUT's chat template when its tokenizer has one, else the prompt, each reply and a new random prompt): each turn is compared with transformers on the whole conversation so far, while the runtime keeps the KV cache and prefills only the new tokens (block_kv_i, --history-kv)."),
    num_device: int = typer.Option(1, "--num-device", help="Instead, the tensor-parallel shard proof: cut each block over this many devices by heads and MLP columns, run the shards in onnxruntime, sum them like the all-reduce and compare with the whole block; with --bmodel (compiled --num-device N), run each device's parts of tpu-mlir's split on the cmodel, chained, against the whole block (docs/explanation/tensor-parallel.md)."),
) -> None:
    """Drive OUT's segments (or, with --bmodel, the compiled bmodel on the cmodel) like the TPU runtime and compare
    tokens and logits with transformers' greedy generate."""
    from ..proof.verify import verify

    if num_device != 1:
        _verify_shards(out, num_device, model, seed, bmodel, json_out)
        return
    report = verify(out, prompt_length=prompt_length, new_tokens=new_tokens, seed=seed, model_path=model,
                    stream_reference=stream_reference, bmodel=bmodel, tpu_mlir=tpu_mlir, turns=turns,
                    image=_images(image),
                    lora=lora)
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
        if report.vision is not None:
            v = report.vision
            _echo(f"image {v['image']} (grid {v['grid_thw']}, {v['image_tokens']} tokens): vit cosine "
                  f"{v['vit_cosine']:.7f} (>= {v['min_vit_cosine']}) against transformers' vision features")
        if report.mask_check is not None:
            m = report.mask_check
            _echo(f"mask {m['pattern']} (read as {m['value']:.4g}) instead of -10000: tokens {m['tokens']} "
                  f"{'equal' if report.mask_check_ok else 'DIFFER'}")
        typer.echo("PASS" if report.passed else "FAIL")
    if not report.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _images(images: Optional[List[Path]]) -> Optional[List[Path]]:
    """--image given once or more (None when not given)."""
    return list(images) if images else None


def _verify_shards(out: Path, num_device: int, model: Optional[str], seed: int, bmodel: Optional[Path],
                   json_out: bool) -> None:
    from ..proof.tensor_parallel import verify_shards

    if bmodel is not None:
        _verify_device_nets(out, num_device, bmodel, seed, json_out)
        return
    report = verify_shards(out, num_device, model_path=model, seed=seed)
    if json_out:
        typer.echo(json.dumps(report.to_json()))
    else:
        for s in report.split.shards:
            _echo(f"device {s.device}: query heads {s.q_heads.start}..{s.q_heads.stop - 1}, KV heads "
                  f"{s.kv_heads.start}..{s.kv_heads.stop - 1}, MLP columns {s.columns.start}..{s.columns.stop - 1}")
        _echo(f"{'segment':<16} {'output':<34} {'cosine':>10}  {'max|diff|':>10}  {'rel':>9}  result")
        for c in report.checks:
            _echo(f"{c.segment:<16} {c.output:<34} {c.cosine:>10.7f}  {c.max_abs_diff:>10.3e}  {c.rel_diff:>9.2e}  "
                  f"{'ok' if c.ok else 'MISMATCH'}")
        min_cos, max_rel = report.thresholds
        _echo(f"{len(report.checks)} comparisons of the {num_device} shards, reduced, against the whole blocks "
              f"({report.dtype}; cosine >= {min_cos}, rel diff <= {max_rel}); not simulated: the inter-device "
              "all-reduce and tpu-mlir's own split")
        typer.echo("PASS" if report.passed else "FAIL")
    if not report.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _verify_device_nets(out: Path, num_device: int, bmodel: Path, seed: int, json_out: bool) -> None:
    from ..proof.device_nets import MIN_COSINE, verify_device_nets

    report = verify_device_nets(out, bmodel, num_device, seed=seed)
    # the split form hands the mask to tpu-mlir without the contract's Clip: how the other encoding fares is told,
    # not judged (a BF16 net gives NaN with 0xF0E2, measured; runtimes must write MASK_VALUE for these nets)
    other = verify_device_nets(out, bmodel, num_device, seed=seed, other_mask=True) if report.checks else None
    if json_out:
        typer.echo(json.dumps(report.to_json() | ({"other_mask": other.to_json()} if other else {})))
    else:
        _echo(f"{len(report.nets_run)} device parts run on the cmodel, one at a time, chained as the cascade nets "
              "chain them")
        if report.unsplit:
            _echo(f"not split by tpu-mlir (not checked here): {', '.join(report.unsplit)}")
        _echo(f"{'segment':<16} {'output':<16} {'cosine':>10}  {'max|diff|':>10}  devices  result")
        for c in report.checks:
            _echo(f"{c.segment:<16} {c.output:<16} {c.cosine:>10.7f}  {c.max_abs_diff:>10.3e}  "
                  f"{'agree' if c.devices_agree else 'DIFFER':<7}  {'ok' if c.ok else 'MISMATCH'}")
        _echo(f"against the whole blocks in onnxruntime (float32; cosine >= {MIN_COSINE}); not simulated: the "
              "transfers between devices")
        if other is not None:
            worst = min(c.cosine for c in other.checks)
            _echo(f"with masked positions written as {other.mask}: "
                  + ("the same result" if other.passed else
                     f"{'NaN' if worst != worst else f'min cosine {worst:.4f}'}: the split form takes the mask "
                     f"without the contract's Clip, so a runtime must write {report.mask} for these nets"))
        typer.echo("PASS" if report.passed else "FAIL")
    if not report.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("run")
@user_errors
def run_cmd(
    out: OutFolder,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The prompt text (tokenized with OUT's own tokenizer)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as a user turn with the model's chat template."),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="An image for a vision-language output (resized within its --max-pixels by the model's own image processor); it goes in front of the prompt, or at the prompt's image placeholder. Give it more than once for several images, one per placeholder in order."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Stop after this many new tokens (or at EOS, or when the window is full)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Token ids instead of text, e.g. 1,2,3 (works without a tokenizer)."),
    backend: Backend = "onnx",
    bmodel: BmodelFile = None,
    tpu_mlir: TpuMlirVenv = None,
    sample: bool = typer.Option(False, "--sample", help="Draw each token from OUT's sample head (export with --sample-head) instead of greedy."),
    temperature: float = typer.Option(1.0, "--temperature", help="With --sample: softmax temperature (> 0)."),
    top_p: float = typer.Option(1.0, "--top-p", help="With --sample: nucleus mass to keep, in (0, 1]."),
    top_k: int = typer.Option(50, "--top-k", help="With --sample: the most likely tokens to keep, 1..50."),
    penalty: float = typer.Option(1.0, "--penalty", help="With --sample: repetition penalty on the tokens so far (1: none)."),
    seed: int = typer.Option(0, "--seed", help="With --sample: seed of the host's draws (the same seed gives the same tokens)."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="A PEFT LoRA adapter folder whose A and B fill the LoRA inputs of an output exported with --lora-max-rank (without it: zeros, the base model)."),
    json_out: JsonOut = False,
) -> None:
    """Generate text from OUT the way the TPU runtime drives the nets (greedy, or --sample), streaming tokens as they come."""
    from ..runtime.sampling import SamplingParams
    from ..runtime.text import parse_ids, run_prompt

    stream = None if json_out or _state["verbosity"] < 0 else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    result = run_prompt(out, prompt=prompt, prompt_ids=parse_ids(prompt_ids) if prompt_ids is not None else None,
                        chat=chat, max_new_tokens=max_new_tokens, backend=backend, bmodel=bmodel, venv=tpu_mlir,
                        on_text=stream, sampling=SamplingParams(temperature, top_p, top_k, penalty, seed) if sample else None,
                        image=_images(image), lora=lora)
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
    backend: Backend = "onnx",
    bmodel: BmodelFile = None,
    tpu_mlir: TpuMlirVenv = None,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest reply (it also stops at EOS and when the window is full)."),
) -> None:
    """Chat with OUT turn by turn (its tokenizer's chat template). The conversation stays in the KV cache: with
    --history-kv each turn prefills only its new tokens. /image FILE attaches an image to the next turn (a
    vision-language output; once per image), /reset starts over, /exit (or end of input) quits."""
    from ..errors import UsageError
    from ..runtime.chat import ChatSession, ConversationFull

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
            if text == "/image" or text.startswith("/image "):
                file = text[len("/image"):].strip()
                try:
                    if not file:
                        raise UsageError("/image needs a file: /image FILE")
                    waiting = session.attach(file)
                except UsageError as bad:
                    typer.echo(f"sorry: {bad.problem}", err=True)
                    continue
                typer.echo(f"[{waiting} image(s) for the next turn]", err=True)
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


@app.command("eval")
@user_errors
def eval_cmd(
    out: OutFolder,
    text: Optional[Path] = typer.Option(None, "--text", help="A UTF-8 text file to score (tokenized with OUT's tokenizer)."),
    builtin: bool = typer.Option(False, "--builtin", help="Score the text that ships with tpugraph instead: chapters 1 to 3 of Jane Austen's Pride and Prejudice (public domain, about 3,600 tokens)."),
    windows: int = typer.Option(4, "--windows", help="Windows to score: the text's first N consecutive windows (fewer if it holds fewer)."),
    window_length: Optional[int] = typer.Option(None, "--window-length", help="Tokens per window, 2..L (default L, the prefill nets' input length); each window is scored from its own start."),
    bmodel: Optional[Path] = typer.Option(None, "--bmodel", help="Score this combined bmodel on tpu-mlir's cmodel instead of OUT's ONNX segments; compile it with --eval-head."),
    tpu_mlir: TpuMlirVenv = None,
    model: Optional[str] = typer.Option(None, "--model", help="Source model folder, if it moved since the export."),
    json_out: JsonOut = False,
) -> None:
    """Perplexity of OUT's segments (onnxruntime) or of a bmodel (cmodel) and of transformers on the same windows of a
    text, side by side, with the top-1 agreement of their next-token predictions. Each window is one prefill and one
    run of lm_head_all (lm_head over every position)."""
    from ..proof.perplexity import evaluate

    report = evaluate(out, text=text, builtin=builtin, windows=windows, window_length=window_length, bmodel=bmodel,
                      tpu_mlir=tpu_mlir, model_path=model)
    if json_out:
        typer.echo(json.dumps(report.to_json()))
        return
    _echo(f"text: {report.text}, {report.text_tokens} tokens; {len(report.windows)} window(s) of "
          f"{report.window_length} tokens, {report.positions} positions scored")
    _echo(f"{'':<34} {'perplexity':>12}  {'seconds':>8}")
    _echo(f"{report.reference:<34} {report.reference_perplexity:>12.4f}  {report.reference_seconds:>8.1f}")
    _echo(f"{(report.mode + ' on ' + report.backend):<34} {report.perplexity:>12.4f}  {report.backend_seconds:>8.1f}")
    typer.echo(f"perplexity difference {100 * report.relative_difference:+.4f}% of transformers'; top-1 agreement "
               f"{100 * report.top1_agreement:.2f}% ({round(report.top1_agreement * report.positions)} of "
               f"{report.positions} positions)")
