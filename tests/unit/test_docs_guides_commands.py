"""Every tpugraph command in docs/guides and docs/explanation parses: its command exists and each flag and value is
one the command line takes (click parses the line without running it). The README's and the tutorials' commands
are run for real (tests/real_model/test_docs_commands.py); the guides' need models and hours a test cannot spend, so
this is what keeps them from drifting away from the command line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tpugraph.cli import _global_flags_first, app

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs" / "guides").glob("*.md")) + sorted((ROOT / "docs" / "explanation").glob("*.md"))
FENCE = re.compile(r"```(?:bash|sh|shell)?\n(.*?)```", re.S)


def documented_commands() -> list[tuple[str, str]]:
    """(page, the tpugraph arguments) of every fenced shell line that runs tpugraph."""
    found = []
    for page in PAGES:
        for block in FENCE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("   #")[0].strip()
                match = re.search(r"(?:^|\|\s*|&&\s*)(?:\S*/)?tpugraph\s+(.*)$", line)
                if match and not line.startswith("#"):
                    found.append((page.name, match.group(1)))
    return found


COMMANDS = documented_commands()


def test_the_guides_document_commands():
    assert len(COMMANDS) >= 30, COMMANDS  # the pages above document about forty: a broken extraction finds none
    assert {page for page, _ in COMMANDS} >= {"compile.md", "multi-turn.md", "llm-tpu-runtime.md",
                                              "quantized-checkpoints.md"}


@pytest.mark.parametrize("page,args", COMMANDS, ids=[f"{p}:{a[:40]}" for p, a in COMMANDS])
def test_documented_command_parses(page, args):
    # A shell variable stands for one argument (a path): a stand-in keeps the words in their places. --help at the
    # end makes the command line parse every word (an unknown command or flag, a flag without its value fail
    # here) and then print the help instead of running.
    words = ["ARG" if w.startswith("$") else w for w in shlex.split(args)]
    result = CliRunner().invoke(app, _global_flags_first(words + ["--help"]))
    assert result.exit_code == 0, f"{page}: `tpugraph {args}` does not parse: {result.output.strip()[-300:]}"
    assert "Usage:" in result.output
