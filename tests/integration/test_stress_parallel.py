"""A few iterations of scripts/stress_parallel_export.py: parallel exports (CLI subprocess and threads in this
process) leave stdout with one complete JSON line, stderr empty and identical outputs (issue #15)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "stress_parallel_export.py"


def _load():
    spec = importlib.util.spec_from_file_location("stress_parallel_export", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_parallel_exports_keep_stdout_stderr_and_outputs_intact(capsys):
    stress = _load()
    assert stress.main(["--iterations", "2", "--threads", "2", "--seq-length", "32"]) == 0
    assert "all 2 iterations passed" in capsys.readouterr().out


def test_the_stress_check_sees_a_replaced_stdout(tmp_path, monkeypatch):
    stress = _load()

    def replaces_stdout(model, out, options):
        import io

        sys.stdout = io.StringIO()  # what redirect_stdout racing with another thread leaves behind

    monkeypatch.setattr("tpugraph.export.pipeline.export_and_optimize", replaces_stdout)
    stdout = sys.stdout
    try:
        with pytest.raises(stress.Failure, match="replaced"):
            stress.in_process_round("tiny-llama", [tmp_path / "a"], 32)
    finally:
        sys.stdout = stdout
