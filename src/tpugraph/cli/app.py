"""The typer application every command hangs on: global flags (-v, -q, --version), and the one way every command
fails: one `error: ...` line on stderr (a JSON object on stdout under --json) and the code of errors.EXIT_CODES."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import typer
from typer.core import TyperGroup

from ..errors import EXIT_CODES, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, TpugraphError


if hasattr(typer, "TyperException"):  # typer >= 0.22 carries its own click
    _ParseError = typer.TyperException
else:  # pragma: no cover - older typer on click
    from click import ClickException as _ParseError


class OneLineErrors(TyperGroup):
    """Option parsing errors (an unknown flag, `--seq-length abc`, a missing -o or argument) as one `error:`
    line naming the command's --help, exit 2, instead of click's boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except _ParseError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # `tpugraph`, `tpugraph manifest`: the help
                if err.format_message():  # (rich prints it already while the error is made)
                    typer.echo(err.format_message())
                sys.exit(0)
            text = " ".join(err.format_message().split()).rstrip(".")
            text = text[:1].lower() + text[1:]
            ctx = getattr(err, "ctx", None)
            path = " ".join(["tpugraph", *(ctx.command_path.split()[1:] if ctx else [])])
            report_error(f"{text} (see {path} --help)", EXIT_USAGE, json_out="--json" in argv)
            sys.exit(EXIT_USAGE)
        except typer.Abort:
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


_EXITS = ", ".join(f"{row.code} {row.name}" for row in EXIT_CODES)
app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hugging Face causal LMs -> the ONNX segments Sophgo's tpu-mlir and LLM-TPU runtime expect.",
                  epilog=f"Exit codes (every command): {_EXITS}. An error is one 'error: ...' line on stderr; under "
                         '--json it is {"error": ..., "exit_code": N} on stdout.')
manifest_app = typer.Typer(no_args_is_help=True, help="Read and check OUT/manifest.json.")
passes_app = typer.Typer(no_args_is_help=True, help="List the graph passes, or run some of them on one file.")
app.add_typer(manifest_app, name="manifest")
app.add_typer(passes_app, name="passes")

_state = {"verbosity": 0}


def _echo(msg: str = "") -> None:
    if _state["verbosity"] >= 0:
        typer.echo(msg)


def print_json(value) -> None:
    typer.echo(json.dumps(value))


# Library argument -> the flag that sets it, where the two are not spelled alike.
FLAG_OF = {"greedy_in_lm_head": "--lm-head-greedy", "passes": "--passes", "skip_passes": "--skip-pass",
           "pass_options": "--option"}


def flag_of(option: str) -> str:
    return FLAG_OF.get(option, "--" + option.replace("_", "-"))


def _cli_text(err: TpugraphError) -> str:
    """A library error in the CLI's words: a UsageError about an argument names its flag."""
    option = getattr(err, "option", None)
    return f"{flag_of(option)} {err.problem}" if option else str(err)


def report_error(text: str, code: int, json_out: bool = False) -> None:
    """`error: TEXT` on stderr, or under --json {"error": TEXT, "exit_code": CODE} on stdout, where the reader
    of the command's JSON looks."""
    if json_out:
        print_json({"error": text, "exit_code": code})
    else:
        typer.echo(f"error: {text}", err=True)


def user_errors(fn):
    """Turn a TpugraphError into one line (or JSON object) and its exit code; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        json_out = bool(kwargs.get("json_out"))
        try:
            return fn(*args, **kwargs)
        except TpugraphError as err:
            report_error(_cli_text(err), err.exit_code, json_out)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt as err:  # an export's Interrupted says what it kept; others keep nothing
            text = f"interrupted: {err}" if str(err) else "interrupted"
            if json_out:
                print_json({"error": text, "exit_code": EXIT_INTERRUPTED})
            typer.echo(text, err=True)
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
            report_error(f"internal error ({type(exc).__name__}: {first}); rerun with -vv for the traceback and "
                         "report it", EXIT_INTERNAL, json_out)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _show_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"tpugraph {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_options(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-vv for debug)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                 help="Print tpugraph's version and exit."),
) -> None:
    _state["verbosity"] = -1 if quiet else verbose
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
