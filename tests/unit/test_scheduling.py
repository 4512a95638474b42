"""The shared task runner (tpugraph.scheduling) that owns the threads of an export and of a compile: ordering
constraints, the first failure stopping what has not started, one job in the calling thread, bad task graphs."""

from __future__ import annotations

import threading
import time

import pytest

from tpugraph.scheduling import Stopped, Task, run_tasks


def _recorder():
    log: list[tuple[str, str]] = []
    lock = threading.Lock()

    def task(name: str, seconds: float = 0.0, fail: bool = False):
        def run():
            with lock:
                log.append(("start", name))
            time.sleep(seconds)
            if fail:
                raise RuntimeError(f"{name} failed")
            with lock:
                log.append(("end", name))
        return run

    return log, task


@pytest.mark.parametrize("jobs", [1, 2, 4])
def test_a_task_starts_only_after_the_tasks_it_comes_after(jobs):
    log, task = _recorder()
    tasks = [Task("a", task("a", 0.05)), Task("b", task("b", 0.01), ("a",)), Task("c", task("c")),
             Task("d", task("d"), ("b", "c"))]
    run = run_tasks(tasks, jobs)
    assert sorted(run.started) == ["a", "b", "c", "d"] and run.skipped == []
    position = {event: i for i, event in enumerate(log)}
    assert position[("end", "a")] < position[("start", "b")]
    assert position[("end", "b")] < position[("start", "d")] and position[("end", "c")] < position[("start", "d")]


def test_ready_tasks_start_in_the_order_given():
    log, task = _recorder()
    run_tasks([Task(n, task(n)) for n in "qwertz"], jobs=1)
    assert [name for event, name in log if event == "start"] == list("qwertz")


def test_tasks_run_side_by_side_up_to_jobs():
    running, peak, lock = [0], [0], threading.Lock()

    def work():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    run_tasks([Task(str(i), work) for i in range(6)], jobs=2)
    assert peak[0] == 2


def test_one_job_runs_in_the_calling_thread():
    threads = []
    run_tasks([Task(str(i), lambda: threads.append(threading.current_thread())) for i in range(3)], jobs=1)
    assert threads == [threading.main_thread()] * 3


@pytest.mark.parametrize("jobs", [1, 2])
def test_the_first_failure_stops_what_has_not_started_and_is_raised(jobs):
    log, task = _recorder()
    stop = threading.Event()
    tasks = [Task("bad", task("bad", 0.01, fail=True)), Task("slow", task("slow", 0.1)),
             Task("later", task("later"), ("slow",)), Task("after_bad", task("after_bad"), ("bad",))]
    with pytest.raises(RuntimeError, match="bad failed"):
        run_tasks(tasks, jobs, stop)
    assert stop.is_set()
    started = [name for event, name in log if event == "start"]
    assert "later" not in started and "after_bad" not in started
    if jobs == 2:  # the task already running when the failure came finished
        assert ("end", "slow") in log


def test_a_task_that_saw_the_stop_event_is_no_error_of_its_own():
    stop = threading.Event()

    def polite():
        stop.set()
        raise Stopped()

    run = run_tasks([Task("polite", polite), Task("next", lambda: None, ("polite",))], jobs=2, stop=stop)
    assert run.started == ["polite"] and run.skipped == ["next"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_bad_task_graphs_are_refused(jobs):
    with pytest.raises(ValueError, match="unknown"):
        run_tasks([Task("a", lambda: None, ("nope",))], jobs)
    with pytest.raises(ValueError, match="unique"):
        run_tasks([Task("a", lambda: None), Task("a", lambda: None)], jobs)
    with pytest.raises(ValueError, match="circle"):
        run_tasks([Task("a", lambda: None, ("b",)), Task("b", lambda: None, ("a",))], jobs)
