"""The tpugraph command line: thin typer commands, each calling one library function. The commands live by stage
(export_commands, run_commands, compile_commands) on the one app of app.py."""

from __future__ import annotations

import sys

from ..errors import EXIT_INTERRUPTED
# isort: off
# Each registers its commands on app; in this order they appear in --help (the pipeline: export, run, compile).
from . import export_commands, run_commands, compile_commands, serve_commands  # noqa: F401
# isort: on
from .app import app

GLOBAL_FLAGS = {"-q", "--quiet", "-v", "-vv", "-vvv", "--verbose"}


def _global_flags_first(argv: list[str]) -> list[str]:
    """Accept -v/-q anywhere on the line (`tpugraph verify out -q`), as users type them."""
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    return flags + _sample_head_value([a for a in argv if a not in GLOBAL_FLAGS])


def _sample_head_value(argv: list[str]) -> list[str]:
    """`--sample-head` alone means `--sample-head current` (its value is optional: `--sample-head legacy`)."""
    from ..contract.segments import SAMPLE_HEADS

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
