"""Interrupted runs: kill -9 or Ctrl-C mid-export, then a rerun finishes only what is missing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_LLAMA, build_model_dir

SEQ = "32"


def _export_cmd(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tpugraph", "-v", "export-and-optimize", str(model), "-o", str(out), "--seq-length", SEQ]


def _wait_for_partial(out: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120.0) -> int:
    partial = out / ".tpugraph-partial.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"export ended (rc={proc.returncode}) before it could be interrupted")
        try:
            done = len(json.loads(partial.read_text())["segments"])
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= at_least:
            return done
        time.sleep(0.005)
    pytest.fail("export made no progress")


def _onnx_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.onnx*"))}


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory):
    model = build_model_dir(tmp_path_factory.mktemp("m"), "llama", seed=5, **dict(TINY_LLAMA, num_hidden_layers=6))
    ref = tmp_path_factory.mktemp("ref") / "out"
    r = subprocess.run(_export_cmd(model, ref), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return model, ref


def test_kill_9_then_rerun_finishes_only_missing_segments_byte_identical(model_and_reference, tmp_path):
    model, ref = model_and_reference
    out = tmp_path / "out"
    proc = subprocess.Popen(_export_cmd(model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = _wait_for_partial(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "a killed run must not look finished"
    r = subprocess.run(_export_cmd(model, out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kept = r.stderr.count("unchanged since the last run, kept")
    assert kept >= done, r.stderr
    assert kept < 16, "the rerun should have had work left to do"
    assert _onnx_files(out) == _onnx_files(ref)
    assert not list(out.glob(".tpugraph-*")), "scratch files of the killed run must be gone"
    ref_m = json.loads((ref / "manifest.json").read_text())
    got_m = json.loads((out / "manifest.json").read_text())
    assert [(s["name"], s["sha256"]) for s in got_m["segments"]] == [(s["name"], s["sha256"]) for s in ref_m["segments"]]


def test_ctrl_c_exits_130_keeps_finished_segments_and_rerun_resumes(model_and_reference, tmp_path):
    model, ref = model_and_reference
    out = tmp_path / "out"
    # SIGINT back to its default in the child: a test run started in the background of a non-interactive
    # shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all.
    proc = subprocess.Popen(_export_cmd(model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_partial(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err
    assert not (out / "manifest.json").exists()
    partial = json.loads((out / ".tpugraph-partial.json").read_text())
    assert partial["complete"] is False and len(partial["segments"]) >= 2
    for seg in partial["segments"]:
        assert (out / seg["file"]).is_file()
    # the message comes from what was actually kept: the partial manifest's segments
    assert f"interrupted: {len(partial['segments'])} of 16 segments are finished and kept in {out}" in err, err
    r = subprocess.run(_export_cmd(model, out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kept = r.stderr.count("unchanged since the last run, kept")
    assert kept >= len(partial["segments"])
    assert f"kept {kept}, built {16 - kept} of 16 segments in {out}" in r.stdout, r.stdout
    assert _onnx_files(out) == _onnx_files(ref)


def test_rerun_of_a_finished_output_keeps_everything(model_and_reference, tmp_path):
    import shutil

    model, ref = model_and_reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    r = subprocess.run(_export_cmd(model, out), capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stderr.count("unchanged since the last run, kept") == 16
    assert f"kept 16 of 16 segments, nothing to do in {out}" in r.stdout, r.stdout
    # A different option is a different input: nothing may be reused.
    r = subprocess.run(_export_cmd(model, out)[:-1] + ["24"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "unchanged since the last run, kept" not in r.stderr
    assert f"built 16 segments in {out}" in r.stdout, r.stdout


def _manifest_without_timings(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    for seg in manifest["segments"]:
        seg.pop("export_seconds", None)
        for result in seg["passes"]:
            result.pop("seconds", None)
    return manifest


def test_parallel_jobs_write_the_same_output_byte_for_byte(model_and_reference, tmp_path):
    model, ref = model_and_reference
    out = tmp_path / "out"
    r = subprocess.run(_export_cmd(model, out) + ["--jobs", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "manifest.json"}  # noqa: E731
    assert files(out) == files(ref)
    assert _manifest_without_timings(out) == _manifest_without_timings(ref)


def test_ctrl_c_before_any_segment_is_finished_says_nothing_was_kept(tmp_path, monkeypatch):
    """The interrupt message comes from real state: none finished, so it must not claim segments are kept."""
    from typer.testing import CliRunner

    from tpugraph.cli import app
    from tpugraph.export import scheduler

    def interrupted(self, unit, pending):
        raise KeyboardInterrupt

    monkeypatch.setattr(scheduler.Scheduler, "unit", interrupted)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export-and-optimize", "tiny-llama", "-o", str(out), "--seq-length", SEQ])
    assert result.exit_code == 130, result.output
    assert "interrupted: no segment was finished" in result.output and "are finished and kept" not in result.output
    assert not (out / "manifest.json").exists()
