"""Tasks with ordering constraints -> run in ``jobs`` threads: the one thread pool of an export (its work units) and of
a compile (its tool runs) alike.

A task starts once every task it comes ``after`` has finished, and among the tasks that may start, in the order
given. The first failure sets the stop event: no task starts after it, the running ones finish (a task may also
read the event to stop early, raising ``Stopped``), and that first error is raised. With one job the tasks run in
the calling thread, in order, and no thread is started at all.

Where a task's heavy call runs is the executor's choice (make_executor): here (LocalExecutor), or as a Ray task on a
cluster (RayExecutor, `compile --executor ray`); the order of the tasks is run_tasks's either way.
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


class LocalExecutor:
    """Where a task's heavy call runs: here, in the task's own thread."""

    name = "local"

    def call(self, fn: Callable, *args):
        return fn(*args)

    def close(self) -> None:
        pass


class RayExecutor:
    """A task's heavy call as a Ray task (one CPU) on a cluster: the one at ``address``, else the one this process
    is already connected to, else a local cluster started here (and shut down by ``close``). The calls must be
    picklable module-level functions, and their files on a file system every node sees (a local cluster's is
    this machine's). The ordering of the tasks stays run_tasks's: each task's thread waits for its Ray call."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            from .errors import UsageError

            raise UsageError("--executor ray needs Ray: pip install 'tpugraph[ray]'") from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            kwargs = {"address": address} if address else {"num_cpus": num_cpus}
            ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
        self._remote = ray.remote(num_cpus=1)(_call_remote)

    @property
    def cpus(self) -> int:
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def call(self, fn: Callable, *args):
        return self._ray.get(self._remote.remote(fn, *args))

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def _call_remote(fn: Callable, *args):
    return fn(*args)


EXECUTORS = ("local", "ray")


def make_executor(name: str, address: str | None = None, num_cpus: int | None = None):
    """The executor of that name (EXECUTORS); raises UsageError for another name or a missing extra."""
    from .errors import UsageError

    if name == "local":
        if address:
            raise UsageError("--ray-address applies to --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, num_cpus)
    raise UsageError(f"executor must be one of {', '.join(EXECUTORS)} (got '{name}')")
