"""export_and_optimize from Python behaves as the command; library errors speak the library's terms and the
CLI turns them into its flags; exit codes match the README's table (issue #15, item 5)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.errors import UsageError
from tpugraph.export.pipeline import ExportOptions, export_and_optimize

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize("options,field", [
    (ExportOptions(seq_length=0), "seq_length"), (ExportOptions(jobs=-1), "jobs"),
    (ExportOptions(dtype="float8"), "dtype"), (ExportOptions(int_dtype="int16"), "int_dtype"),
    (ExportOptions(external_data="sometimes"), "external_data"), (ExportOptions(naming="onnx"), "naming"),
])
def test_library_errors_name_the_argument_not_a_flag(options, field):
    with pytest.raises(UsageError) as info:
        options.check()
    assert info.value.option == field
    assert "--" not in str(info.value) and str(info.value).startswith(field)


def test_the_cli_names_the_flag_of_a_library_error(tmp_path):
    code, out = run("export-and-optimize", "tiny-llama", "-o", tmp_path / "o", "--naming", "onnx")
    assert code == 2
    assert [line for line in out.splitlines() if line.startswith("error:")] == [
        "error: --naming must be one of llm-tpu, optimum, genie (got onnx)"]


@pytest.mark.slow
def test_python_call_does_what_the_command_does(tmp_path):
    cli_out, lib_out = tmp_path / "cli", tmp_path / "lib"
    code, out = run("export-and-optimize", "tiny-llama", "-o", cli_out, "--seq-length", 16, "--naming", "optimum",
                    "--passes", "fix_static_shapes,rename_kv_io", "--with-test-data", "--json")
    assert code == 0, out
    manifest = export_and_optimize("tiny-llama", lib_out, ExportOptions(
        seq_length=16, naming="optimum", passes=["fix_static_shapes,rename_kv_io"], with_test_data=True))
    assert json.loads(out)["test_data"] == [e.test_data.file for e in manifest.segments]
    assert manifest.conventions.naming == "optimum"
    assert [p.name for p in manifest.pass_chain] == ["fix_static_shapes", "rename_kv_io"]
    for entry in manifest.segments:
        assert (lib_out / entry.test_data.file).is_file()
        assert (lib_out / entry.file).read_bytes() == (cli_out / entry.file).read_bytes()


@pytest.mark.parametrize("command", [["verify"], ["manifest", "validate"]])
def test_a_folder_that_is_not_a_tpugraph_output_exits_5(tmp_path, command):
    (tmp_path / "stuff.txt").write_text("not ours")
    code, out = run(*command, tmp_path)
    assert code == 5, out
    assert "not a tpugraph output" in out


def test_a_bad_prompt_length_exits_2(tmp_path):
    out = tmp_path / "o"
    assert run("export-and-optimize", "tiny-llama", "-o", out, "--seq-length", 16, "--passes", "none")[0] == 0
    code, output = run("verify", out, "--prompt-length", 0)
    assert code == 2, output
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        "error: --prompt-length must be >= 1 (got 0)"]


def test_export_jobs_zero_takes_two_threads_for_a_model_that_fits_an_eighth_of_the_memory():
    from tpugraph.export.pipeline import auto_jobs

    class Weights:  # 1000 float32 weights: 4000 bytes
        def keys(self):
            return ["a", "b"]

        def shape_and_dtype(self, key):
            return ((10, 50), "bfloat16")

    import os

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: auto_jobs is always 1 here")
    assert auto_jobs(Weights(), memory_bytes=32_000) == 2
    assert auto_jobs(Weights(), memory_bytes=31_999) == 1  # a big model streams one layer at a time
