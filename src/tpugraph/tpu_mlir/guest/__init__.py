"""Scripts that tpu-mlir's own Python 3.10 venv runs, started by their path: the Top-dialect transform, the bmodel
weight rewrite, the tool fork server and the cmodel runtime driver. They import nothing of tpugraph (a test reads
their imports); the host imports only ``wire``, the pipe format both sides speak."""

from pathlib import Path

GUEST_DIR = Path(__file__).parent


def guest_script(name: str) -> Path:
    """The path of one guest script, for the tpu-mlir venv's Python to run."""
    return GUEST_DIR / name
