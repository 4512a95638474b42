"""Errors a user can cause, each mapped to one line of text and a documented exit code."""

from __future__ import annotations


class TpugraphError(Exception):
    """A failure the user can act on: the CLI prints ``str(err)`` on one line and exits ``exit_code``."""

    exit_code = 1


class UsageError(TpugraphError):
    """Bad options or option combinations.

    ``option`` names the library argument at fault (``seq_length``); the message then says what is wrong
    with it, and a front end names it its own way (the CLI prints ``--seq-length``)."""

    exit_code = 2

    def __init__(self, message: str, option: str | None = None):
        self.option = option
        self.problem = message
        super().__init__(f"{option} {message}" if option else message)


class ModelError(TpugraphError):
    """The model folder, its config or its weights cannot be used."""

    exit_code = 3


class UnsupportedModelError(ModelError):
    """A well-formed model of an architecture tpugraph does not support."""

    exit_code = 4


class OutputError(TpugraphError):
    """The output folder cannot be written, or is not a tpugraph output."""

    exit_code = 5


class PassError(TpugraphError):
    """A graph pass failed; the model it ran on is left as it was."""

    exit_code = 6

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
    """Numerical or token parity failed, or a manifest does not match its files."""

    exit_code = 7


class CompileError(TpugraphError):
    """The TPU toolchain rejected a segment."""

    exit_code = 8


EXIT_INTERNAL = 70  # a bug in tpugraph (EX_SOFTWARE)
EXIT_INTERRUPTED = 130
