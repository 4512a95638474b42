"""Errors a user can cause, each mapped to one line of text and a documented exit code (EXIT_CODES)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExitCode:
    """One row of the exit-code table every command follows (docs/reference/exit-codes.md renders it)."""

    code: int
    name: str
    meaning: str
    example: str


EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_UNSUPPORTED_MODEL = 4
EXIT_OUTPUT = 5
EXIT_PASS_FAILED = 6
EXIT_INVALID_OUTPUT = 7
EXIT_COMPILE_FAILED = 8
EXIT_INTERNAL = 70  # a bug in tpugraph (EX_SOFTWARE)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C

EXIT_CODES: list[ExitCode] = [
    ExitCode(EXIT_OK, "ok", "The command did what it was asked; every check it ran passed.",
             "tpugraph verify out  (prints PASS)"),
    ExitCode(EXIT_CHECK_FAILED, "check-failed",
             "A numerical or token check ran to its end and failed: verify's tokens or logits differ from "
             "transformers, compile's end-to-end check on the cmodel, passes run --check above its tolerance.",
             "tpugraph verify out  (prints FAIL)"),
    ExitCode(EXIT_USAGE, "usage",
             "Bad command line: an unknown flag, a missing or unparsable value, options that do not go together, "
             "or a request the output cannot serve (a prompt longer than SEQ, --prompt without a tokenizer, "
             "--backend bmodel without a bmodel or tpu-mlir venv).",
             "tpugraph export-and-optimize tiny-llama -o out --seq-length abc"),
    ExitCode(EXIT_MODEL, "model",
             "The model cannot be read: no such folder or preset, no or bad config.json, missing or truncated "
             "weights, an input file that is not a readable ONNX model, a source model that moved away.",
             "tpugraph export-and-optimize ./no-such-folder -o out"),
    ExitCode(EXIT_UNSUPPORTED_MODEL, "unsupported-model",
             "A well-formed model of an architecture or variant tpugraph does not support (see tpugraph families), "
             "or one that needs --trust-remote-code.",
             "tpugraph export-and-optimize ./mamba-130m -o out"),
    ExitCode(EXIT_OUTPUT, "output",
             "The output folder cannot be written (not writable, disk full), or is not a tpugraph output.",
             "tpugraph verify ./my-documents"),
    ExitCode(EXIT_PASS_FAILED, "pass-failed",
             "A graph pass failed; the message names the pass, the segment and the passes before it.",
             "tpugraph passes run make_tpu_compatible in.onnx -o out.onnx  (on a graph the pass cannot handle)"),
    ExitCode(EXIT_INVALID_OUTPUT, "invalid-output",
             "An output folder does not match its manifest (a file changed or missing, a malformed manifest), is an "
             "unfinished export, or a bmodel was not compiled from it.",
             "tpugraph manifest validate out  (after block_1.onnx was edited)"),
    ExitCode(EXIT_COMPILE_FAILED, "compile-failed", "tpu-mlir rejected a segment (transform, deploy or combine).",
             "tpugraph compile out"),
    ExitCode(EXIT_INTERNAL, "internal",
             "A bug in tpugraph: the one-line message names the exception; rerun with -vv for the traceback.",
             "(please report it)"),
    ExitCode(EXIT_INTERRUPTED, "interrupted",
             "Ctrl-C. An interrupted export says how many finished segments it kept; rerun it to finish.",
             "Ctrl-C during tpugraph export-and-optimize"),
]


def exit_code(name: str) -> int:
    """The code of a table row by name (``exit_code('usage') == 2``)."""
    return next(row.code for row in EXIT_CODES if row.name == name)


class TpugraphError(Exception):
    """A failure the user can act on: the CLI prints ``str(err)`` on one line and exits ``exit_code``."""

    exit_code = EXIT_CHECK_FAILED


class UsageError(TpugraphError):
    """Bad options, option combinations, or a request the output cannot serve.

    ``option`` names the library argument at fault (``seq_length``); the message then says what is wrong
    with it, and a front end names it its own way (the CLI prints ``--seq-length``)."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, option: str | None = None):
        self.option = option
        self.problem = message
        super().__init__(f"{option} {message}" if option else message)


class ModelError(TpugraphError):
    """The model folder, its config or its weights (or an input ONNX file) cannot be used."""

    exit_code = EXIT_MODEL


class UnsupportedModelError(ModelError):
    """A well-formed model of an architecture tpugraph does not support."""

    exit_code = EXIT_UNSUPPORTED_MODEL


class OutputError(TpugraphError):
    """The output folder cannot be written, or is not a tpugraph output."""

    exit_code = EXIT_OUTPUT


class PassError(TpugraphError):
    """A graph pass failed; the model it ran on is left as it was."""

    exit_code = EXIT_PASS_FAILED

    def __init__(self, pass_name: str, segment: str, before: list[str], reason: str):
        self.pass_name = pass_name
        self.segment = segment
        self.before = list(before)
        self.reason = reason
        ran = ", ".join(before) if before else "none"
        super().__init__(f"pass '{pass_name}' failed on segment '{segment}' (passes run before it: {ran}): {reason}")


class PassFailed(Exception):
    """Raised inside a graph pass with a reason meant for the user; the pass runner turns it into a
    PassError naming the pass, the segment and the passes that ran before it."""


class VerificationError(TpugraphError):
    """An output does not match its manifest, is unfinished, or a bmodel was not compiled from it."""

    exit_code = EXIT_INVALID_OUTPUT


class CheckFailedError(VerificationError):
    """A numerical check ran and failed (outputs differ above the tolerance)."""

    exit_code = EXIT_CHECK_FAILED


class CompileError(TpugraphError):
    """The TPU toolchain rejected a segment."""

    exit_code = EXIT_COMPILE_FAILED


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job that keeps what it finished; the message says what was actually kept."""
