"""onnxsim in a child process of its own: what it prints is captured per call, never on our stdout.

onnxsim reports through Python's ``print`` (and its C++ core through file descriptors 1 and 2). In this
process both are shared by every thread, and pointing ``sys.stdout`` elsewhere for a call while
other threads run can leave ``sys.stdout`` pointing at a closed buffer (issue #15). A child process owns
its descriptors: each call's output is captured there and comes back with the result.

One child serves one call at a time; idle children are kept in a queue for the next call, so a run pays
onnxsim's import (seconds) once per concurrently simplifying thread, not once per segment, and this
process never imports onnxsim at all. Children exit when their stdin closes (this process ending).
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_HEADER = struct.Struct("<Q")


def _send(stream, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("onnxsim child process ended")
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("onnxsim child process ended")
    return pickle.loads(data)


class OnnxsimChildError(Exception):
    """onnxsim raised in the child: ``type_name`` and the first line of its message."""

    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message


class OnnxsimProcess:
    """A child process running ``onnxsim.simplify``: one request at a time."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._log = tempfile.TemporaryFile(prefix="tpugraph-onnxsim-")  # the child's own stderr, for crashes
        self._proc = subprocess.Popen([sys.executable, "-m", "tpugraph.passes.onnxsim_process"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env)

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            _send(self._proc.stdin, request)
            reply = _receive(self._proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            self.close()
            raise RuntimeError(f"the onnxsim child process failed ({exc}): {self._crash_text()}") from None
        if reply.get("error"):
            raise OnnxsimChildError(*reply["error"])
        return reply

    def _crash_text(self) -> str:
        try:
            self._log.seek(0)
            lines = self._log.read().decode(errors="replace").strip().splitlines()
            return lines[-1] if lines else f"exit code {self._proc.poll()}"
        except (OSError, ValueError):
            return "no output"

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()
        self._log.close()


_idle: queue.SimpleQueue[OnnxsimProcess] = queue.SimpleQueue()
_started: list[OnnxsimProcess] = []


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Run one request in an idle child (started when none is idle); returns the child's reply."""
    try:
        child = _idle.get_nowait()
    except queue.Empty:
        child = OnnxsimProcess()
        _started.append(child)
    try:
        reply = child.call(request)
    except OnnxsimChildError:
        _idle.put(child)  # onnxsim refused the model; the child is fine
        raise
    except BaseException:
        child.close()
        raise
    _idle.put(child)
    return reply


def prestart() -> None:
    """Start a child now when none was ever started: its import of onnxsim (seconds) then overlaps with
    the caller's own work instead of delaying the first simplification."""
    if not _started:
        child = OnnxsimProcess()
        _started.append(child)
        _idle.put(child)


def simplify(model_bytes: bytes, kwargs: dict[str, Any]) -> tuple[bytes, bool, str]:
    """(simplified model bytes, onnxsim's ok, what onnxsim printed) for a serialised model."""
    reply = run({"op": "simplify", "model": model_bytes, "kwargs": kwargs})
    return reply["model"], reply["ok"], reply["printed"]


def simplify_file(src: str, dst: str, kwargs: dict[str, Any]) -> tuple[bool, str]:
    """onnxsim reads ``src`` and writes ``dst`` itself (models past protobuf's limit)."""
    reply = run({"op": "simplify_file", "src": src, "dst": dst, "kwargs": kwargs})
    return reply["ok"], reply["printed"]


def version() -> str:
    """onnxsim's ``__version__`` (asked of a child: this process does not import onnxsim)."""
    return run({"op": "version"})["version"]


@atexit.register
def _close_all() -> None:
    for child in _started:
        try:
            child.close()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass


# -- the child ---------------------------------------------------------------------------------------
def _serve() -> None:
    import inspect
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes this child

    channel_in = os.fdopen(os.dup(0), "rb")
    channel_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # nothing but replies on the channel, whatever prints outside a request

    try:
        import onnx
        import onnxsim
    except ImportError as exc:
        onnxsim = None
        import_error = exc

    def kwargs(request: dict[str, Any]) -> dict[str, Any]:
        if "certify" in inspect.signature(onnxsim.simplify).parameters:
            return {**request["kwargs"], "certify": False}  # newer onnxsim tries a z3 proof by default
        return request["kwargs"]

    while True:
        try:
            request = _receive(channel_in)
        except EOFError:
            return
        reply: dict[str, Any] = {}
        with tempfile.TemporaryFile() as captured:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(captured.fileno(), 1)
            os.dup2(captured.fileno(), 2)
            try:
                if onnxsim is None:
                    raise import_error
                if request["op"] == "version":
                    reply["version"] = getattr(onnxsim, "__version__", "unknown")
                elif request["op"] == "simplify":
                    out, ok = onnxsim.simplify(onnx.load_from_string(request["model"]), **kwargs(request))
                    reply.update(model=out.SerializeToString(), ok=ok)
                elif request["op"] == "simplify_file":
                    _, ok = onnxsim.simplify(request["src"], output_path=request["dst"], **kwargs(request))
                    reply["ok"] = ok
            except Exception as exc:  # noqa: BLE001 - reported to the caller, which decides
                text = str(exc).strip().splitlines()
                reply = {"error": (type(exc).__name__, text[0] if text else "")}
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
            captured.seek(0)
            reply["printed"] = captured.read().decode(errors="replace")
        _send(channel_out, reply)


if __name__ == "__main__":
    _serve()
