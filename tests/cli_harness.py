"""The command line driven in-process (typer's CliRunner) and the one-line-error check of the bad-input tests."""

from __future__ import annotations

from typer.testing import CliRunner

from tpugraph.cli import app

runner = CliRunner()


def run(*args):
    """(exit code, output) of `tpugraph ARGS...`."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def one_line(code, output, expected_code, *needles):
    """The exit code expected, no traceback, and exactly one `error:` line that names every needle."""
    assert code == expected_code, (code, output)
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
