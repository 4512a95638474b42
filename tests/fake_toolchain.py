"""Stand-ins for the tpu-mlir tools (model_transform.py, model_deploy.py, model_tool and the venv python that runs
tpugraph's transform driver): they record their arguments and print what the real tools print. Shared by the tests of
the compile runner."""

from __future__ import annotations

from pathlib import Path

FAKE_TOOL = """#!/usr/bin/env bash
# stand-in for {tool}: records its arguments, prints what the real tool prints
echo "{tool} $*" >> "{log}"
name=$(basename "$PWD")
if [ "$name" = "{fail_segment}" ] && [ "{tool}" = "{fail_tool}" ]; then
    echo "Traceback (most recent call last):"
    echo "RuntimeError: Unsupport opset for ReduceMean"
    exit 1
fi
case "{tool}" in
  model_transform.py) for a in "$@"; do [ "$a" = --test_input ] && echo "min_similarity = (0.999, 0.99, 40.0)"; done; touch "$name.mlir" ;;
  model_deploy.py) for a in "$@"; do [ "$a" = --test_input ] && printf 'min_similarity = (0.998, 0.95, 30.0)\\nnpz compare PASSED.\\nmin_similarity = (0.9995, 0.97, 35.0)\\n'; done; touch "$name.bmodel" ;;
  model_tool) out=""; prev=""; for a in "$@"; do [ "$prev" = -o ] && out=$a; prev=$a; done; touch "$out" ;;
esac
"""


FAKE_PYTHON = """#!/usr/bin/env bash
# stand-in for the venv's python running tpugraph's transform driver, which runs model_transform in-process
case "$1" in */tpu_mlir_transform.py) shift; [ "$1" = --no-fuse ] && shift; [ "$1" = --skip-onnxsim ] && shift; exec "$(dirname "$0")/model_transform.py" "$@" ;; esac
echo "unexpected python call: $*" >&2; exit 2
"""


def fake_venv(root: Path, fail_segment: str = "", fail_tool: str = "") -> Path:
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python3").write_text(FAKE_PYTHON)
    (venv / "bin" / "python3").chmod(0o755)
    for tool in ("model_transform.py", "model_deploy.py", "model_tool"):
        path = venv / "bin" / tool
        path.write_text(FAKE_TOOL.format(tool=tool, log=root / "calls.log", fail_segment=fail_segment,
                                         fail_tool=fail_tool))
        path.chmod(0o755)
    return venv
