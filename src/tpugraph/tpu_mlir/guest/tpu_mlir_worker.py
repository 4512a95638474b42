"""A fork server for tpu-mlir's Python tools, run by the tpu-mlir venv's Python (it imports nothing of tpugraph).

    python tpu_mlir_worker.py [--preload]

Every ``model_transform.py`` spends about 5 of its 6 seconds here importing (its ONNX front end pulls in
onnxruntime_extensions, transformers and torch; the machine compiles every import afresh), and
``model_deploy.py`` starts two interpreters (the entry script re-executes the tool). This process imports the
tools' modules once (``--preload``), then runs each job in a child forked from itself: the child starts with
everything imported, runs the tool's script as ``__main__`` in the job's folder with its output in the job's log,
and exits with the tool's exit code. Nothing runs in this process itself but the imports, the forks and the
bookkeeping, so every child starts from the same state and the jobs cannot see each other.

Protocol, one JSON object per line: on stdin ``{"id": N, "argv": [...], "cwd": DIR, "log": FILE}`` where argv[0]
is a Python script path or the name of a tpu-mlir tool (``model_transform.py``, ``model_deploy.py``); on the
protocol pipe (this process's stdout as it started) ``{"ready": true}`` once the imports are done, then
``{"id": N, "rc": CODE}`` as each job ends (in the order they end). End of stdin: wait for the running children,
then exit.
"""

from __future__ import annotations

import json
import os
import runpy
import select
import sys
import traceback

# tpu-mlir's tools import these at their top (or lazily, for the ONNX front end and the interpreters)
PRELOAD = (
    "numpy", "pymlir",
    "tpu_mlir.python.utils.mlir_shell", "tpu_mlir.python.utils.mlir_parser", "tpu_mlir.python.utils.misc",
    "tpu_mlir.python.utils.preprocess", "tpu_mlir.python.utils.auto_remove", "tpu_mlir.python.utils.log_setting",
    "tpu_mlir.python.utils.cache_tool", "tpu_mlir.python.tools.gen_rewriter_config",
    "tpu_mlir.python.tools.gen_layer_group_config", "tpu_mlir.python.tools.deploy_qat",
    "tpu_mlir.python.tools.model_runner", "transform.BaseConverter", "transform.OnnxConverter",
    "onnx", "onnxsim", "onnxruntime",
)


def tool_script(name: str) -> str:
    """A job's argv[0] as a script path: a tpu-mlir tool name is looked up in tpu-mlir's tools folder."""
    if os.sep in name:
        return name
    root = os.environ["TPUC_ROOT"]
    return os.path.join(root, "python", "tools", name)


def run_child(job: dict) -> int:
    """In the forked child: the job's tool as __main__, output to its log. Returns the exit code."""
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    code = 0
    try:
        os.chdir(job["cwd"])
        script = tool_script(job["argv"][0])
        sys.argv = [script, *job["argv"][1:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # the tool's own failure: its traceback goes to its log, as a subprocess's would
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    return code


def main() -> None:
    if os.environ.get("TPUGRAPH_TPU_MLIR_WORKER") != "exec":
        # `import tpu_mlir` puts tpu-mlir's libraries on LD_LIBRARY_PATH, which the dynamic loader reads only when
        # a process starts (tpu-mlir's own entry scripts start the tool as a new process for this): start again
        import tpu_mlir  # noqa: F401

        os.environ["TPUGRAPH_TPU_MLIR_WORKER"] = "exec"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    proto = os.dup(1)  # the protocol pipe; fd 1 and 2 of this process go to its stderr from here on
    os.dup2(2, 1)
    os.set_inheritable(proto, False)

    def say(obj: dict) -> None:
        os.write(proto, (json.dumps(obj) + "\n").encode())

    import tpu_mlir  # noqa: F401  (sets TPUC_ROOT, PATH, LD_LIBRARY_PATH and sys.path for the tools)

    if "--preload" in sys.argv[1:]:
        import importlib

        for module in PRELOAD:
            try:
                importlib.import_module(module)
            except Exception as exc:  # a tool that needs it imports it itself (and fails there, in its log)
                print(f"tpu_mlir_worker: preload {module}: {exc}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    say({"ready": True})

    children: dict[int, int] = {}  # pid -> job id
    pending = b""
    stdin_open = True
    while stdin_open or children:
        if stdin_open:
            readable, _, _ = select.select([0], [], [], 0.02 if children else None)
            if readable:
                chunk = os.read(0, 65536)
                if not chunk:
                    stdin_open = False
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if not line.strip():
                        continue
                    job = json.loads(line)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        os.close(proto)
                        os._exit(run_child(job))
                    children[pid] = job["id"]
        while children:
            pid, status = os.waitpid(-1, 0 if not stdin_open else os.WNOHANG)
            if pid == 0:
                break
            if pid in children:
                say({"id": children.pop(pid), "rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
