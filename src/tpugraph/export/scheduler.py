"""The owner of an export's threads: fingerprints hashed ahead in a thread, units built as tasks of the shared
task runner (tpugraph.scheduling, the compile's too) in ``jobs`` threads under the plan's order constraints (a unit
starts after its leader finished), commits run in one commit thread, at most one in flight, in submission order.
Nothing else in an export starts a thread (external-data files hash and write through their own single-thread
queues, see export/external_data.py)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

from ..contract.manifest import SegmentEntry
from ..scheduling import Stopped, Task, run_tasks
from .committer import Committer, UnitWriter
from .plan import WorkUnit, still_valid

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (segment, index, total)


class _CommitQueue:
    """Commits (and records of kept units) in one background thread, at most one in flight, so the next
    unit is built while the last one is fsynced and renamed. ``wait`` raises the error of the one in flight."""

    def __init__(self, committer: Committer):
        self.committer = committer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="commit")
        self._in_flight: Future | None = None
        self._lock = threading.Lock()  # units built in parallel (--jobs) submit from several threads

    def _then(self, job, *args) -> None:
        with self._lock:
            self._wait()
            self._in_flight = self._pool.submit(job, *args)

    def submit(self, writer: UnitWriter, entries: list[SegmentEntry]) -> None:
        self._then(self.committer.commit, writer, entries)

    def keep(self, entries: list[SegmentEntry]) -> None:
        """Record segments an earlier run finished (in order with the commits)."""
        self._then(self.committer.record, entries)

    def wait(self) -> None:
        with self._lock:
            self._wait()

    def _wait(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def close(self, failing: bool) -> None:
        """Let the unit in flight finish; when the run is already failing, its own error is only logged."""
        try:
            self.wait()
        except Exception as exc:
            if not failing:
                raise
            log.info("while stopping: %s", exc)
        finally:
            self._pool.shutdown(wait=True)


class Scheduler:
    """Builds, writes and records the plan's work units, one at a time or in ``jobs`` parallel threads.

    The factory (made by ``make_factory`` in the calling thread, when a unit needs building) knows nothing
    about threads: the order it needs, a unit after the leader whose optimised graph it reuses, is the
    ``after`` constraint (``plan.leaders``) this class enforces."""

    def __init__(self, out_dir: Path, previous: dict[str, SegmentEntry], committer: Committer,
                 progress: ProgressFn | None, total: int, make_factory: Callable):
        self.out_dir = out_dir
        self.previous = previous
        self.commits = _CommitQueue(committer)
        self.progress = progress
        self.total = total
        self._make_factory = make_factory
        self.factory = None
        self._done = 0
        self._lock = threading.Lock()  # the progress count
        self._stop = threading.Event()
        self.started: list[str] = []  # units in the order they started (for tests of the constraints)
        self.kept: list[str] = []  # segments an earlier run finished, kept as they are
        self.built: list[str] = []  # segments built and handed to the committer

    def _factory(self):
        if self.factory is None:  # only ever called before the worker threads start, or without them
            self.factory = self._make_factory()
        return self.factory

    def run(self, units: list[WorkUnit], fingerprint: Callable[[WorkUnit], str], jobs: int,
            key_of: Callable[[WorkUnit], object] | None = None) -> None:
        """Run every unit; ``fingerprint`` (a unit's resume key) is computed ahead in a thread of its own.
        ``key_of`` (default: the factory's layer structure) gives the units whose graphs are shared."""
        from .plan import leaders

        hasher = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")
        fingerprints = [hasher.submit(fingerprint, unit) for unit in units]
        failing = True
        try:
            # One job: the plan's order is every leader before its followers, and no structure key is needed
            # (working it out makes the factory, which a rerun that keeps everything never needs).
            after = leaders(units, key_of or self._layer_key) if jobs > 1 else {}
            tasks = [Task(unit.name, partial(self.unit, unit, pending),
                          (after[unit.name],) if unit.name in after else ())
                     for unit, pending in zip(units, fingerprints)]
            run_tasks(tasks, jobs, self._stop, thread_name_prefix="unit")
            failing = False
        finally:
            hasher.shutdown(wait=True, cancel_futures=True)
            self.commits.close(failing)

    def _layer_key(self, unit: WorkUnit):
        from .factory import LAYER_KINDS

        factory = self._factory()
        return tuple(factory.layer_key(s) for s in unit.specs if s.kind in LAYER_KINDS) or None

    def _step(self, name: str) -> None:
        with self._lock:
            done, self._done = self._done, self._done + 1
        if self.progress:
            self.progress(name, done, self.total)

    def unit(self, unit: WorkUnit, pending_fingerprint: Future) -> None:
        from .graph_surgery import unused_graph_inputs

        self.started.append(unit.name)
        fingerprint = pending_fingerprint.result()
        kept = [self.previous.get(spec.name) for spec in unit.specs]
        seen: dict[str, str] = {}
        if all(e is not None and still_valid(e, self.out_dir, fingerprint, seen) for e in kept):
            for entry in kept:
                log.info("%s: unchanged since the last run, kept", entry.name)
                self._step(entry.name)
            self.commits.keep(kept)
            with self._lock:
                self.kept += [entry.name for entry in kept]
            return
        factory = self._factory()
        writer = UnitWriter(self.out_dir, unit)
        entries = []
        try:
            for spec in unit.specs:
                if self._stop.is_set():
                    raise Stopped()
                self._step(spec.name)
                t0 = time.perf_counter()
                built = factory.build(spec)
                entry = SegmentEntry(name=spec.name, kind=spec.kind, layer=spec.layer, file=spec.filename,
                                     inputs=list(spec.inputs), outputs=list(spec.outputs))
                _apply_renames(entry, built.pass_results)
                if unused := unused_graph_inputs(built.model):
                    entry.unused_inputs = unused
                entry.passes = [r.to_json() for r in built.pass_results]
                entry.fingerprint = fingerprint
                swapped_from = built.swapped_from
                if swapped_from:
                    entry.graph_reused_from = swapped_from
                entry.external_data = writer.add(built)
                del built
                entry.export_seconds = round(time.perf_counter() - t0, 3)
                log.info("%s done (%.2fs%s)", spec.name, time.perf_counter() - t0,
                         f", weights swapped into the graph of {swapped_from}" if swapped_from else "")
                entries.append(entry)
        except BaseException:
            writer.discard()
            raise
        self.commits.submit(writer, entries)
        with self._lock:
            self.built += [entry.name for entry in entries]


def _apply_renames(entry: SegmentEntry, pass_results) -> None:
    """Keep the manifest's I/O names equal to the file's after a renaming pass."""
    from dataclasses import replace

    for result in pass_results:
        mapping = result.mapping
        if not mapping:
            continue
        entry.inputs = [replace(t, name=mapping.get(t.name, t.name)) for t in entry.inputs]
        entry.outputs = [replace(t, name=mapping.get(t.name, t.name)) for t in entry.outputs]
        entry.io_mapping = mapping
