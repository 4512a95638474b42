"""The chips of compiler/chips.py on the cmodel: the tiny preset compiled for bm1688 and cv186x and proven by
verify --bmodel (greedy tokens equal to transformers'). cv186x BF16 runs by default; the other chip x mode pairs
with TPUGRAPH_ALL_FAMILY_COMPILES=1."""

from __future__ import annotations

import os

import pytest

from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

pytestmark = pytest.mark.slow

SEQ = 16
PROMPT = [1, 45, 97, 200]
ALL = os.environ.get("TPUGRAPH_ALL_FAMILY_COMPILES") == "1"
DEFAULT = ("cv186x", "bf16")
# W4BF16 on this 64-wide random preset: the bmodel compiles for both chips and runs on their cmodels, but 4-bit
# round-to-nearest moves its logits below verify's W4 thresholds (cosine 0.90-0.95 against 0.95, measured
# 2026-12-03 on bm1688 and cv186x): an xfail that says so, strict so that a pass is noticed.
W4_ON_THE_TINY_PRESET = pytest.mark.xfail(strict=True, reason="4-bit round-to-nearest on the 64-wide random preset "
                                          "is below verify's W4 logit thresholds (cosine 0.90-0.95 < 0.95)")
PAIRS = [pytest.param(*DEFAULT, id="-".join(DEFAULT))] + [pytest.param(c, m, id=f"{c}-{m}", marks=[W4_ON_THE_TINY_PRESET] if m == "w4bf16" else [])
                     for c in ("bm1688", "cv186x") for m in ("f16", "bf16", "w4bf16") if (c, m) != DEFAULT]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("chips") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ))
    return out


@pytest.mark.parametrize("chip, mode", PAIRS)
def test_chip_bmodel_verifies(exported, toolchain, chip, mode):
    if (chip, mode) != DEFAULT and not ALL:
        pytest.skip("set TPUGRAPH_ALL_FAMILY_COMPILES=1 to compile every chip and mode (about a minute each)")
    report = compile_segments(exported, toolchain, CompileOptions(chip=chip, quantize=mode, check="none"), jobs=2)
    assert report.bmodel.name == f"llama_{mode}_seq{SEQ}_{chip}_1dev.bmodel"
    assert report.memory is not None and report.memory.fits and report.memory.chip.name == chip
    result = verify(exported, prompt=PROMPT, new_tokens=3, bmodel=report.bmodel, tpu_mlir=toolchain)
    assert result.backend.startswith("bmodel on the cmodel") and chip.upper() in result.backend.upper()
    assert result.tokens_equal and result.passed, result.to_json()
