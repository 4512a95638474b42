"""The typer application every command hangs on: global flags, the one-line error handling of every command, and
the progress reporters."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

import typer

from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, TpugraphError

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
