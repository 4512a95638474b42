"""The tpu-mlir fork server (tpu_mlir/worker.py + guest/tpu_mlir_worker.py): each job runs as its own child with its own
folder, argv, log and exit code; jobs run side by side; a worker that is gone hands the jobs back to the caller,
which runs them as subprocesses (compiler.runner.run_tool)."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path

import pytest

from tpugraph.compiler.runner import run_tool
from tpugraph.tpu_mlir.toolchain import tool_environment
from tpugraph.tpu_mlir.worker import ToolWorker


def _script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture()
def worker(toolchain, tmp_path):
    w = ToolWorker(toolchain, tool_environment(toolchain), preload=False, log_path=tmp_path / "worker.log")
    assert w._ready.wait(60), "the worker never got ready"
    yield w
    w.close()


def test_while_the_worker_imports_one_job_is_handed_back(toolchain, tmp_path):
    """The first job that comes before the worker is ready runs beside it as a subprocess (None: the caller runs
    it); the next ones wait for the worker."""
    w = ToolWorker(toolchain, tool_environment(toolchain), preload=False)
    script = _script(tmp_path, "ok.py", "import sys; sys.exit(4)\n")
    try:
        if w._ready.is_set():
            pytest.skip("the worker was ready before the first job could be sent (machine too fast to observe)")
        assert w.run(["python3", str(script)], tmp_path, tmp_path / "a.log") is None
        assert w.run(["python3", str(script)], tmp_path, tmp_path / "b.log") == 4
    finally:
        w.close()


def test_a_job_runs_in_its_folder_with_its_arguments_and_exit_code(worker, tmp_path):
    script = _script(tmp_path, "echo.py", """
        import os, sys
        print("cwd", os.getcwd())
        print("argv", sys.argv[1:], "main", __name__)
        print("to stderr", file=sys.stderr)
        sys.exit(int(sys.argv[1]))
        """)
    for code in (0, 3):
        folder = tmp_path / f"job{code}"
        folder.mkdir()
        rc = worker.run(["python3", str(script), str(code), "x y"], folder, folder / "out.log")
        text = (folder / "out.log").read_text()
        assert rc == code
        assert f"cwd {folder}" in text and f"argv ['{code}', 'x y'] main __main__" in text and "to stderr" in text


def test_a_failing_tool_leaves_its_traceback_in_its_log(worker, tmp_path):
    script = _script(tmp_path, "boom.py", "raise ValueError('no such net')\n")
    rc = worker.run(["python3", str(script)], tmp_path, tmp_path / "boom.log")
    assert rc == 1
    assert "ValueError: no such net" in (tmp_path / "boom.log").read_text()


def test_jobs_run_side_by_side(worker, tmp_path):
    """Each job waits (up to 60 s) for the other's file: only jobs that run at the same time both end 0."""
    script = _script(tmp_path, "meet.py", """
        import sys, time, pathlib
        mine, other = sys.argv[1:]
        pathlib.Path(mine).write_text("here")
        for _ in range(600):
            if pathlib.Path(other).exists():
                sys.exit(0)
            time.sleep(0.1)
        sys.exit(7)
        """)
    codes = {}

    def job(me: str, other: str) -> None:
        codes[me] = worker.run(["python3", str(script), str(tmp_path / me), str(tmp_path / other)], tmp_path,
                               tmp_path / f"{me}.log")

    threads = [threading.Thread(target=job, args=("a", "b")), threading.Thread(target=job, args=("b", "a"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == {"a": 0, "b": 0}


def test_a_worker_that_is_gone_hands_its_jobs_back(toolchain, tmp_path):
    env = tool_environment(toolchain)
    w = ToolWorker(toolchain, env, preload=False)
    w._proc.kill()
    w._reader.join(timeout=30)
    script = _script(tmp_path, "ok.py", "import sys; print('ran', sys.executable); sys.exit(5)\n")
    assert w.run(["python3", str(script)], tmp_path, tmp_path / "a.log") is None
    # the runner's fallback: the same tool as a subprocess of the venv's python
    assert run_tool(["python3", str(script)], tmp_path, tmp_path / "b.log", env, w) == 5
    assert "ran" in (tmp_path / "b.log").read_text()
    w.close()


def test_only_python_tools_are_served():
    assert ToolWorker.serves(["python3", "x.py"]) and ToolWorker.serves(["model_deploy.py", "--mlir", "a"])
    assert not ToolWorker.serves(["model_tool", "--combine"])
