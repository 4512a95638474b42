"""Where tpu-mlir lives: its venv (made by scripts/setup_tpu_mlir.sh) and the environment its tools run in."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

TOOLS = ("model_transform.py", "model_deploy.py", "model_tool")


def default_tpu_mlir_venv() -> Path:
    """$TPUGRAPH_TPU_MLIR_VENV, else where scripts/setup_tpu_mlir.sh puts the venv by default."""
    configured = os.environ.get("TPUGRAPH_TPU_MLIR_VENV")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tpugraph" / "tpu-mlir-venv"


def check_toolchain(venv: str | Path | None = None) -> Path:
    """The tpu-mlir venv to use (default: default_tpu_mlir_venv()), or a UsageError saying how to make one."""
    venv = Path(venv if venv is not None else default_tpu_mlir_venv()).expanduser().resolve()
    missing = [t for t in TOOLS if not (venv / "bin" / t).exists()]
    if missing:
        raise UsageError(f"'{venv}' is not a tpu-mlir venv (no {', '.join(missing)} in its bin/): "
                         "create one with scripts/setup_tpu_mlir.sh")
    return venv


def tool_environment(venv: Path) -> dict[str, str]:
    """The environment the tools run in: the tpu-mlir venv first on PATH, none of tpugraph's Python settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", str(min(4, os.cpu_count() or 1)))
    return env
