"""tpugraph eval on the real SmolLM2-135M ($TPUGRAPH_SMOLLM2, skipped with the reason when absent): the perplexity of
its ONNX segments in onnxruntime on the built-in text equals transformers' to 1e-3 relative, on the same windows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.perplexity import evaluate

pytestmark = pytest.mark.slow


def test_smollm2_onnx_perplexity_equals_transformers_on_the_builtin_text(tmp_path):
    folder = os.environ.get("TPUGRAPH_SMOLLM2")
    if not folder or not (Path(folder) / "config.json").is_file():
        pytest.skip("$TPUGRAPH_SMOLLM2 does not name a model folder: build one with "
                    "scripts/make_smollm2.py DIR and export TPUGRAPH_SMOLLM2=DIR")
    out = tmp_path / "out"
    export_and_optimize(folder, out, ExportOptions(seq_length=64, jobs=2))
    report = evaluate(out, builtin=True, windows=4)
    assert len(report.windows) == 4 and report.positions == 4 * 63
    assert abs(report.relative_difference) < 1e-3, report.to_json()
    # a trained model on English prose: far from the vocabulary's 49152 of a uniform guess
    assert 5 < report.reference_perplexity < 100
    assert report.top1_agreement >= 0.99
