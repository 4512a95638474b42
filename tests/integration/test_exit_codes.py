"""The exit-code table (errors.EXIT_CODES) holds in every command: a table of bad inputs, walked across every
command, each giving its documented code and one `error:` line (no traceback), and under --json the same code
with {"error", "exit_code"} on stdout."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.errors import EXIT_CODES, TpugraphError, exit_code

runner = CliRunner()
SEQ = 32


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    """tiny-llama exported once (SEQ=32), a copy with one segment edited, a foreign folder, an unsupported model."""
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize

    root = tmp_path_factory.mktemp("exit-codes")
    good = root / "out"
    export_and_optimize("tiny-llama", good, ExportOptions(seq_length=SEQ, passes=["none"]))
    edited = root / "edited"
    shutil.copytree(good, edited)
    blob = bytearray((edited / "block_1.onnx").read_bytes())
    blob[-1] ^= 0xFF
    (edited / "block_1.onnx").write_bytes(bytes(blob))
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    mamba = root / "mamba"
    mamba.mkdir()
    (mamba / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    return {"OUT": good, "EDITED": edited, "FOREIGN": foreign, "MAMBA": mamba, "ROOT": root}


# (command and arguments with placeholders, exit-code name, a word the error line must hold)
CASES = [
    ("export-and-optimize tiny-llama -o ROOT/x --seq-length abc", "usage", "--seq-length"),
    ("export-and-optimize tiny-llama", "usage", "--out"),
    ("export-and-optimize tiny-llama -o ROOT/x --bogus", "usage", "--bogus"),
    ("export-and-optimize tiny-llama -o ROOT/x --seq-length 0", "usage", "--seq-length"),
    ("export-and-optimize ROOT/no-such-model -o ROOT/x", "model", "not found"),
    ("export-and-optimize MAMBA -o ROOT/x", "unsupported-model", "tpugraph families"),
    ("export-and-optimize tiny-llama -o FOREIGN --seq-length 16", "output", "--force"),
    ("verify", "usage", "out"),
    ("verify OUT --prompt-length abc", "usage", "--prompt-length"),
    ("verify OUT --prompt-length 40", "usage", f"SEQ={SEQ}"),
    ("verify OUT --prompt-length 0", "usage", "--prompt-length"),
    ("verify FOREIGN", "output", "not a tpugraph output"),
    ("verify EDITED", "invalid-output", "sha256"),
    ("run OUT --prompt-ids " + ",".join(["5"] * (SEQ + 1)), "usage", f"SEQ={SEQ}"),
    ("run OUT --prompt hello", "usage", "--prompt-ids"),
    ("run OUT --prompt-ids 1 --max-new-tokens x", "usage", "--max-new-tokens"),
    ("run FOREIGN --prompt-ids 1", "output", "not a tpugraph output"),
    ("run EDITED --prompt-ids 1", "invalid-output", "sha256"),
    ("chat OUT", "usage", "'tpugraph run"),  # a hint the user can follow: chat has no --prompt-ids
    ("chat OUT --bogus", "usage", "--bogus"),
    ("chat FOREIGN", "output", "not a tpugraph output"),
    ("inspect ROOT/missing.onnx", "model", "no such file"),
    ("inspect FOREIGN", "output", "not a tpugraph output"),
    ("inspect FOREIGN/notes.txt", "model", "not a readable ONNX model"),
    ("inspect", "usage", "path"),
    ("manifest validate FOREIGN", "output", "not a tpugraph output"),
    ("manifest validate EDITED", "invalid-output", "problem"),
    ("manifest validate", "usage", "out"),
    ("passes list --bogus", "usage", "--bogus"),
    ("passes run no_such_pass OUT/block_0.onnx -o ROOT/p.onnx", "usage", "no_such_pass"),
    ("passes run remove_identity ROOT/missing.onnx -o ROOT/p.onnx", "model", "no such file"),
    ("passes run remove_identity OUT/block_0.onnx", "usage", "--out"),
    ("passes run remove_identity OUT/block_0.onnx -o ROOT/p.onnx --tolerance abc", "usage", "--tolerance"),
    ("compile-script FOREIGN", "output", "not a tpugraph output"),
    ("compile-script OUT --quantize int3", "usage", "--quantize"),
    ("compile-script OUT --num-device x", "usage", "--num-device"),
    ("compile-script OUT --chip cv186x --num-core 2", "usage", "--num-core"),
    ("compile OUT --quantize int3", "usage", "--quantize"),
    ("compile OUT --tpu-mlir ROOT/no-venv", "usage", "tpu-mlir"),
    ("compile FOREIGN --tpu-mlir ROOT/no-venv", "output", "not a tpugraph output"),
    ("quant-fidelity OUT --half f8", "usage", "--half"),
    ("quant-fidelity FOREIGN", "output", "not a tpugraph output"),
    ("families --bogus", "usage", "--bogus"),
    ("no-such-command", "usage", "no-such-command"),
]
NO_JSON = {"chat"}  # an interactive loop: nothing to report as JSON
# Under --json these print their report (ok: false, the problems), not an error object: see the report test.
REPORTS = {"manifest validate EDITED"}
JSON_CASES = [c for c in CASES if c[0].split()[0] not in NO_JSON and c[0] not in REPORTS]


def _argv(line: str, outs) -> list[str]:
    words = line.split()
    for i, word in enumerate(words):
        for key, path in outs.items():
            if word == key or word.startswith(key + "/"):
                words[i] = str(path) + word[len(key):]
    return words


@pytest.mark.parametrize("line,name,needle", CASES, ids=[c[0].split(" -o")[0][:60] for c in CASES])
def test_bad_input_gives_the_documented_code_and_one_line(outs, line, name, needle):
    result = runner.invoke(app, _argv(line, outs))
    assert result.exit_code == exit_code(name), (result.exit_code, result.output)
    assert "Traceback" not in result.output and "╭" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    assert needle in errors[0], (needle, errors[0])


@pytest.mark.parametrize("line,name,needle", JSON_CASES, ids=[c[0].split(" -o")[0][:60] for c in JSON_CASES])
def test_under_json_the_error_is_a_json_object_with_the_same_code(outs, line, name, needle):
    result = runner.invoke(app, [*_argv(line, outs), "--json"])
    assert result.exit_code == exit_code(name), (result.exit_code, result.output)
    report = json.loads(result.stdout)
    assert report["exit_code"] == exit_code(name) and needle in report["error"], report


def test_the_table_is_data_with_one_row_per_code():
    codes = [row.code for row in EXIT_CODES]
    assert len(set(codes)) == len(codes) and len({row.name for row in EXIT_CODES}) == len(codes)
    assert all(row.meaning and row.example for row in EXIT_CODES)
    assert {0, 1, 2, 70, 130} <= set(codes)


def _error_classes(cls=TpugraphError):
    for sub in cls.__subclasses__():
        yield sub
        yield from _error_classes(sub)


def test_every_error_class_exits_with_a_documented_code():
    import tpugraph.compiler  # noqa: F401 - load the modules that define error classes
    import tpugraph.runtime.chat  # noqa: F401

    documented = {row.code for row in EXIT_CODES}
    classes = list(_error_classes())
    assert len(classes) >= 8
    for cls in classes:
        assert cls.exit_code in documented, cls


def test_the_help_shows_the_table_and_version_prints():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert all(f"{row.code} {row.name}" in result.output for row in EXIT_CODES), result.output
    result = runner.invoke(app, ["--version"])
    from tpugraph import __version__

    assert result.exit_code == 0 and result.output.strip() == f"tpugraph {__version__}"


def test_reporting_commands_answer_json(outs):
    """Shapes in JSON are lists of ints; every reporting command has --json."""
    for argv in (["manifest", "validate", str(outs["OUT"])], ["passes", "list"], ["families"],
                 ["inspect", str(outs["OUT"])], ["inspect", str(outs["OUT"] / "block_0.onnx")],
                 ["compile-script", str(outs["OUT"]), "-o", str(outs["ROOT"] / "c.sh")]):
        result = runner.invoke(app, [*argv, "--json"])
        assert result.exit_code == 0, (argv, result.output)
        data = json.loads(result.stdout)
        assert data, argv
    rows = json.loads(runner.invoke(app, ["inspect", str(outs["OUT"]), "--json"]).stdout)
    assert all(isinstance(d, int) for r in rows for t in r["inputs"] + r["outputs"] for d in t["shape"])
    summary = json.loads(runner.invoke(app, ["inspect", str(outs["OUT"] / "block_0.onnx"), "--json"]).stdout)
    assert all(isinstance(d, int) for t in summary["inputs"] for d in t["shape"])
    edited = runner.invoke(app, ["manifest", "validate", str(outs["EDITED"]), "--json"])
    assert edited.exit_code == exit_code("invalid-output")
    assert json.loads(edited.stdout)["ok"] is False and "block_1" in json.loads(edited.stdout)["problems"][0]
