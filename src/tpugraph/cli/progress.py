"""Progress on stderr: a rich bar with ETA on a terminal, one plain line per finished step otherwise."""

from __future__ import annotations

import contextlib
import sys

import typer


def _columns():
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[what]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


@contextlib.contextmanager
def export_progress(enabled: bool, what: str):
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
    from rich.progress import Progress

    with Progress(*_columns(), console=Console(stderr=True), transient=False) as bar:
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


@contextlib.contextmanager
def compile_progress(enabled: bool):
    """A compile's StepEvent callback: one rich bar with ETA over every step, the end-to-end check included, on a
    terminal; one line per finished step with its time otherwise."""
    if not enabled:
        yield None
        return
    if not sys.stderr.isatty():
        def plain(event) -> None:
            if event.finished:
                what = f"{event.segment}: {event.action}" if event.segment else event.action
                typer.echo(f"[{event.done}/{event.total}] {what} ({event.seconds:.1f}s)"
                           + ("" if event.ok else " FAILED"), err=True)

        yield plain
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(*_columns(), console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("compile", total=None, what="steps")

        def rich_progress(event) -> None:
            what = f"{event.segment}: {event.action}" if event.segment else event.action
            bar.update(task, total=event.total, completed=event.done, description=what)

        yield rich_progress
