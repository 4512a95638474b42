"""tpu-mlir's Python tools run by one fork server (tpu_mlir_worker.py in the tpu-mlir venv) instead of one fresh
interpreter each: the tools' imports (about 5 s per model_transform here) are paid once per compile.

``ToolWorker.run`` may be called from any number of threads at once (the compile runner's pool); the worker
process and the one thread that reads its answers belong to the ToolWorker, which ends both on ``close``. A tool
the worker does not serve, or a worker that is gone, gets a plain subprocess instead, so the worker only ever
makes a compile faster, never different.
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import threading
from pathlib import Path

from .guest import guest_script

log = logging.getLogger(__name__)

DRIVER = "tpu_mlir_worker.py"
SERVED = ("model_transform.py", "model_deploy.py")  # tool names; "python3 SCRIPT" jobs are served too


class ToolWorker:
    def __init__(self, venv: Path, env: dict[str, str], preload: bool = True, log_path: Path | None = None):
        self.python = Path(venv) / "bin" / "python3"
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[threading.Event, list[int | None]]] = {}
        self._ready = threading.Event()
        self._alive = True
        # while the worker imports (one core, seconds), one job may run as a plain subprocess on the other core
        self._bypass_free = True
        argv = [str(self.python), str(guest_script(DRIVER)), *(["--preload"] if preload else [])]
        # the worker's own messages (a module it could not preload) go to log_path
        errors = open(log_path, "wb") if log_path else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                          env=env, bufsize=0)
        finally:
            if log_path:
                errors.close()
        self._reader = threading.Thread(target=self._read, name="tpu-mlir-worker-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for raw in self._proc.stdout:
                msg = json.loads(raw)
                if msg.get("ready"):
                    self._ready.set()
                    continue
                with self._lock:
                    event, box = self._waiting.pop(msg["id"])
                box.append(int(msg["rc"]))
                event.set()
        except (ValueError, KeyError, OSError) as exc:
            log.warning("tpu-mlir worker: unreadable answer (%s); the tools run as subprocesses", exc)
        finally:
            with self._lock:
                self._alive = False
                waiting, self._waiting = self._waiting, {}
            for event, box in waiting.values():
                box.append(None)
                event.set()

    @staticmethod
    def serves(argv: list[str]) -> bool:
        return Path(argv[0]).name == "python3" or argv[0] in SERVED

    def run(self, argv: list[str], cwd: Path, log_path: Path) -> int | None:
        """Run ``argv`` (the form run_step builds: a tool name, or python3 + a script) in ``cwd`` with its output in
        ``log_path``; the tool's exit code (negative: killed by that signal), or None when the caller is to run
        the tool itself: the worker is gone, or it is still importing and no other job runs beside it yet.)"""
        job_argv = argv[1:] if Path(argv[0]).name == "python3" else argv
        event, box = threading.Event(), []
        with self._lock:
            if not self._alive:
                return None
            if not self._ready.is_set() and self._bypass_free:
                self._bypass_free = False  # the caller runs this one itself, beside the worker's imports
                return None
            job_id = next(self._ids)
            self._waiting[job_id] = (event, box)
            line = json.dumps({"id": job_id, "argv": job_argv, "cwd": str(cwd), "log": str(log_path)}) + "\n"
            try:
                self._proc.stdin.write(line.encode())
            except OSError:
                self._waiting.pop(job_id, None)
                self._alive = False
                return None
        event.wait()
        return box[0]

    def close(self) -> None:
        """End of jobs: the worker waits for its children and exits."""
        with self._lock:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5)

    def __enter__(self) -> "ToolWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
