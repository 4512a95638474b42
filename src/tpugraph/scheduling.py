"""Tasks with ordering constraints -> run in ``jobs`` threads: the one thread pool of an export (its work units) and of
a compile (its tool runs) alike.

A task starts once every task it comes ``after`` has finished, and among the tasks that may start, in the order
given. The first failure sets the stop event: no task starts after it, the running ones finish (a task may also
read the event to stop early, raising ``Stopped``), and that first error is raised. With one job the tasks run in
the calling thread, in order, and no thread is started at all.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable


class Stopped(Exception):
    """Raised by a task that saw the stop event (another task failed): it ends without being an error itself."""


@dataclass
class Task:
    name: str
    run: Callable[[], object]
    after: tuple[str, ...] = ()  # names of tasks that must have finished first


@dataclass
class TaskRun:
    """What a run did: the names of the tasks in the order they started, and those that never started."""

    started: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def run_tasks(tasks: list[Task], jobs: int, stop: threading.Event | None = None,
              thread_name_prefix: str = "task") -> TaskRun:
    """Run ``tasks`` honouring their ``after`` constraints; raise the first task's error (see the module doc)."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError("task names must be unique")
    known = set(names)
    for t in tasks:
        if unknown := [a for a in t.after if a not in known]:
            raise ValueError(f"task {t.name} comes after unknown task(s) {unknown}")
    stop = stop if stop is not None else threading.Event()
    run = TaskRun()
    if jobs <= 1:
        _inline(tasks, stop, run)
    else:
        _threaded(tasks, jobs, stop, run, thread_name_prefix)
    return run


def _call(task: Task, stop: threading.Event) -> None:
    try:
        task.run()
    except Stopped:
        pass
    except BaseException:
        stop.set()
        raise


def _inline(tasks: list[Task], stop: threading.Event, run: TaskRun) -> None:
    done: set[str] = set()
    pending = list(tasks)
    while pending:
        ready = next((t for t in pending if all(a in done for a in t.after)), None)
        if ready is None:
            raise ValueError("the tasks' after constraints form a circle: " + ", ".join(t.name for t in pending))
        if stop.is_set():
            run.skipped += [t.name for t in pending]
            return
        pending.remove(ready)
        run.started.append(ready.name)
        _call(ready, stop)
        done.add(ready.name)


def _threaded(tasks: list[Task], jobs: int, stop: threading.Event, run: TaskRun, prefix: str) -> None:
    done: set[str] = set()
    pending = list(tasks)
    running: dict[Future, Task] = {}
    errors: list[BaseException] = []
    with ThreadPoolExecutor(jobs, thread_name_prefix=prefix) as pool:
        try:
            while pending or running:
                if not stop.is_set():
                    for task in [t for t in pending if all(a in done for a in t.after)]:
                        if len(running) >= jobs:
                            break
                        pending.remove(task)
                        run.started.append(task.name)
                        running[pool.submit(_call, task, stop)] = task
                if not running:
                    if pending and not stop.is_set():
                        raise ValueError("the tasks' after constraints form a circle: "
                                         + ", ".join(t.name for t in pending))
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = running.pop(future)
                    if future.exception() is not None:
                        errors.append(future.exception())
                    else:
                        done.add(task.name)
        except BaseException:
            stop.set()
            raise
    run.skipped += [t.name for t in pending]
    if errors:
        raise errors[0]
