"""Every command of README.md and docs/tutorials/*.md works as written.

The ```bash blocks are run in order, each document in turn, in one shared folder (the README's quick start is the
tutorial's start: a command already run there is not run twice), with `.venv/bin/...` meaning this Python and
this checkout's package. Set-up commands (the venv, pip installs, scripts/make_smollm2.py, scripts/setup_tpu_mlir.sh,
the test command) are what .ci/run runs: for those the test checks that .ci/run runs the same command. Commands on
the real model need $TPUGRAPH_SMOLLM2 (the folder stands in for `smollm2`), compile and bmodel commands the tpu-mlir
toolchain; without them they are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs" / "tutorials").glob("*.md"))]
SETUP = re.compile(r"python3 -m venv|pip install|scripts/make_smollm2\.py|scripts/setup_tpu_mlir\.sh|-m pytest")
NEEDS_MODEL = re.compile(r"\bsmollm2\b")
NEEDS_TPU_MLIR = re.compile(r"tpugraph compile\b|--backend bmodel|--bmodel\b")


def bash_commands(document: Path) -> list[str]:
    """The commands of the document's ```bash blocks, one per line (a trailing backslash continues it)."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", document.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def _marks(document: Path) -> list:
    commands = [c for c in bash_commands(document) if not SETUP.search(c)]
    marks = [pytest.mark.slow]
    if any(NEEDS_MODEL.search(c) for c in commands):
        marks.append(pytest.mark.real_model)
    if any(NEEDS_TPU_MLIR.search(c) for c in commands):
        marks.append(pytest.mark.tpu_mlir)
    return marks


def _ci_commands() -> str:
    """.ci/run's text with pip's -q dropped (the docs show pip's output; CI keeps its log short)."""
    return (ROOT / ".ci" / "run").read_text(encoding="utf-8").replace("pip install -q ", "pip install ")


def _as_ci_runs_it(command: str) -> list[str]:
    """A set-up command in the words of .ci/run: its model folder is $SMOLLM2 there, each `&&` part separate."""
    command = re.sub(r"(make_smollm2\.py) smollm2\b", r'\1 "$SMOLLM2"', command)
    return [part.strip() for part in command.split("&&")]


def _missing() -> dict[str, str]:
    """Resource -> why it is absent."""
    missing = {}
    model = os.environ.get("TPUGRAPH_SMOLLM2")
    if not model or not (Path(model) / "config.json").is_file():
        missing["model"] = ("$TPUGRAPH_SMOLLM2 does not name a model folder (scripts/make_smollm2.py DIR; "
                            ".ci/run builds it)")
    from tpugraph.errors import UsageError
    from tpugraph.tpu_mlir.toolchain import check_toolchain

    try:
        check_toolchain()
    except UsageError as err:
        missing["tpu_mlir"] = f"no tpu-mlir toolchain: {err}"
    return missing


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """One folder for every document's commands, with scripts/ and (when given) the real model in it."""
    folder = tmp_path_factory.mktemp("docs-commands")
    (folder / "scripts").symlink_to(ROOT / "scripts")
    model = os.environ.get("TPUGRAPH_SMOLLM2")
    if model:
        (folder / "smollm2").symlink_to(Path(model).resolve())
    return {"folder": folder, "done": set(), "missing": _missing()}


def _shell(command: str) -> str:
    python = f'"{sys.executable}"'
    return re.sub(r"\.venv/bin/(tpugraph|python)\b",
                  lambda m: f"{python} -m tpugraph" if m.group(1) == "tpugraph" else python, command)


@pytest.mark.parametrize("document", [pytest.param(d, marks=_marks(d), id=str(d.relative_to(ROOT)))
                                      for d in DOCUMENTS])
def test_document_commands_run(document, workspace):
    commands = bash_commands(document)
    assert commands, f"{document.name} has no ```bash block"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    ci = _ci_commands()
    skipped = []
    for command in commands:
        if SETUP.search(command):
            not_in_ci = [part for part in _as_ci_runs_it(command) if part not in ci]
            assert not not_in_ci, f"{document.name}: .ci/run does not run {not_in_ci} (from `{command}`)"
            continue
        needs = ({"model"} if NEEDS_MODEL.search(command) else set()) | (
            {"tpu_mlir"} if NEEDS_TPU_MLIR.search(command) else set())
        absent = [workspace["missing"][n] for n in sorted(needs) if n in workspace["missing"]]
        if absent:
            skipped.append((command, absent))
            continue
        if command in workspace["done"]:
            continue
        result = subprocess.run(_shell(command), shell=True, executable="/bin/bash", cwd=workspace["folder"], env=env,
                                capture_output=True, text=True, timeout=3600, check=False)
        assert result.returncode == 0, (f"{document.name}: `{command}` exited {result.returncode}:\n"
                                        f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        workspace["done"].add(command)
    if skipped:
        reasons = sorted({reason for _, absent in skipped for reason in absent})
        pytest.skip(f"{len(skipped)} command(s) of {document.name} not run, from `{skipped[0][0]}` on: "
                    + "; ".join(reasons))
