"""The command line: the main job on the preset, and one clear line + non-zero exit for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import TINY_LLAMA, build_model_dir
from typer.testing import CliRunner

from tpugraph.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def assert_one_clear_line(code, output, *needles):
    assert code != 0, output
    assert "Traceback" not in output, output
    lines = [l for l in output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, output
    for n in needles:
        assert n in lines[0], (n, output)


def test_preset_export_then_verify_via_console_script(tmp_path):
    """The README's first run: `tpugraph export-and-optimize tiny-llama -o out && tpugraph verify out`."""
    out = tmp_path / "out"
    env = dict(os.environ)
    exe = [sys.executable, "-m", "tpugraph"]
    r = subprocess.run([*exe, "export-and-optimize", "tiny-llama", "-o", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stdout
    r = subprocess.run([*exe, "verify", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "PASS"
    r = subprocess.run([*exe, "manifest", "validate", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "ok: 8 segments" in r.stdout


def test_verify_json_report(tmp_path, make_model):
    model = make_model("llama", **TINY_LLAMA)
    out = tmp_path / "o"
    assert run("export-and-optimize", str(model), "-o", str(out), "--seq-length", "24")[0] == 0
    code, output = run("verify", str(out), "--prompt-length", "5", "--new-tokens", "4", "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["passed"] and len(report["onnx_tokens"]) == 4 and len(report["prompt"]) == 5
    assert report["reference"] == "whole"
    code, output = run("verify", str(out), "--prompt-length", "5", "--new-tokens", "4", "--json", "--stream-reference")
    assert code == 0, output
    streamed = json.loads(output)
    assert streamed["reference"] == "streamed" and streamed["onnx_tokens"] == report["onnx_tokens"]
    assert streamed["hf_tokens"] == report["hf_tokens"] and streamed["passed"]


def _all_command_paths():
    """Every command of the typer app, found from the app itself (a new command cannot be forgotten)."""
    import typer.main

    def walk(group, prefix):
        yield prefix
        for name, cmd in getattr(group, "commands", {}).items():
            yield from walk(cmd, prefix + [name])

    return list(walk(typer.main.get_command(app), []))


@pytest.mark.parametrize("help_args", _all_command_paths(), ids=lambda p: " ".join(p) or "tpugraph")
def test_every_command_help_renders(help_args):
    code, output = run(*help_args, "--help")
    assert code == 0 and "Usage" in output


def test_guard_finds_the_commands():
    paths = {" ".join(p) for p in _all_command_paths()}
    assert {"export-and-optimize", "verify", "manifest validate", "passes list", "passes run", "inspect"} <= paths


def test_missing_model(tmp_path):
    code, out = run("export-and-optimize", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert_one_clear_line(code, out, "not found", "tiny-llama")
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README").write_text("hi")
    code, out = run("export-and-optimize", str(tmp_path / "m"), "-o", str(tmp_path / "o"))
    assert_one_clear_line(code, out, "no config.json")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_is_named_and_points_to_families(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    code, out = run("export-and-optimize", str(tmp_path / "m"), "-o", str(tmp_path / "o"))
    assert_one_clear_line(code, out, "MambaForCausalLM", "`tpugraph families`")
    assert "LlamaForCausalLM" not in out and len(out.strip()) < 200  # not the ~40 supported names
    assert code == 4
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["LLamaForCausalLM"]}))
    code, out = run("export-and-optimize", str(tmp_path / "m"), "-o", str(tmp_path / "o"))
    assert_one_clear_line(code, out, "LLamaForCausalLM (did you mean LlamaForCausalLM?)", "`tpugraph families`")


@pytest.mark.parametrize("seq", ["0", "-3", "257"])
def test_bad_seq_length(tmp_path, seq):
    model = build_model_dir(tmp_path / "m", "llama", **TINY_LLAMA)  # max_position_embeddings=256
    code, out = run("export-and-optimize", str(model), "-o", str(tmp_path / "o"), "--seq-length", seq)
    assert_one_clear_line(code, out, "--seq-length")
    assert code == 2
    assert not (tmp_path / "o").exists()


def test_out_not_writable(tmp_path):
    model = build_model_dir(tmp_path / "m", "llama", **TINY_LLAMA)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = run("export-and-optimize", str(model), "-o", str(blocker / "sub"), "--seq-length", "16")
    assert_one_clear_line(code, out, "not writable")
    code, out = run("export-and-optimize", str(model), "-o", str(blocker), "--seq-length", "16")
    assert_one_clear_line(code, out, "not a folder")


def test_refuses_foreign_non_empty_out(tmp_path):
    model = build_model_dir(tmp_path / "m", "llama", **TINY_LLAMA)
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, output = run("export-and-optimize", str(model), "-o", str(out), "--seq-length", "16")
    assert_one_clear_line(code, output, "not a tpugraph output", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_verify_and_validate_refuse_a_folder_without_manifest(tmp_path):
    code, out = run("verify", str(tmp_path))
    assert_one_clear_line(code, out, "manifest.json")
    code, out = run("manifest", "validate", str(tmp_path))
    assert_one_clear_line(code, out, "manifest.json")


def test_families_fits_100_columns_and_json_stays_complete():
    result = runner.invoke(app, ["families"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 100, result.output
    data = json.loads(runner.invoke(app, ["families", "--json"]).output)
    from tpugraph.source.families import FAMILIES

    assert [d["name"] for d in data] == [f.name for f in FAMILIES]
    longest = max(FAMILIES, key=lambda f: len(f.describe()))
    assert len(longest.describe()) > 100  # the case the wrapping is for
    assert next(d for d in data if d["name"] == longest.name)["quirks"] == list(longest.quirks)  # not cut
