"""One cost for a quantized weight (compiler/weight_cost.py), against the layout model_tool --weight showed for one
[4096 -> 1024] MatMul deployed for bm1684x by tpu-mlir 1.30.2 (tensor sizes before their 4 KiB alignment), and the
same cost seen by the memory plan and the perplexity choice."""

from __future__ import annotations

import pytest

from tpugraph.compiler.ppl_choice import DEFAULT_CANDIDATES, Candidate
from tpugraph.compiler.weight_cost import WeightCost

ROWS, COLS = 1024, 4096  # out, in: 65536 groups of 64


@pytest.mark.parametrize("quantize, group, integers, scales, zero_points", [
    # model_tool --weight: tpu.A16MatMul.weight / .scale / .zp ranges of each deploy
    ("w4bf16", 64, 0x200000, 0x20000, 0x10000),
    ("w4bf16", 128, 0x200000, 0x10000, 0x8000),
    ("w4bf16", None, 0x200000, 0x20000, 0x10000),  # no --q_group_size: model_deploy's 64
    ("w8bf16", None, 0x400000, 0x20000, 0x10000),  # W8 too is grouped by 64 by default, not per channel
    ("w8bf16", 64, 0x400000, 0x20000, 0x10000),
])
def test_bytes_are_tpu_mlirs_layout(quantize, group, integers, scales, zero_points):
    assert WeightCost(quantize, group).bytes(ROWS, COLS) == integers + scales + zero_points


def test_float_modes_and_matrices_the_group_does_not_divide():
    assert WeightCost("bf16").bytes(ROWS, COLS) == ROWS * COLS * 2 and WeightCost("f16").bits_per_weight == 16
    # a [160 -> 1024] MatMul deployed W4BF16 or W8BF16 with group 64 came out a BF16 MatMul of 160 x 1024 x 2 bytes
    assert WeightCost("w4bf16", 64).bytes(1024, 160) == 1024 * 160 * 2
    assert WeightCost("w8bf16").bytes(1024, 160) == 1024 * 160 * 2
    assert not WeightCost("w4bf16", 64).is_quantized(160)
    # group 32 divides 160: quantized (5 groups a row)
    assert WeightCost("w4bf16", 32).bytes(1024, 160) == 1024 * 160 // 2 + 1024 * 5 * 3


@pytest.mark.parametrize("quantize, group", [("w4bf16", 64), ("w4f16", 128), ("w8bf16", None), ("bf16", None)])
def test_bits_per_weight_is_the_bytes_of_a_matrix(quantize, group):
    cost = WeightCost(quantize, group)
    assert cost.bits_per_weight == pytest.approx(8 * cost.bytes(ROWS, COLS) / (ROWS * COLS))


def test_the_perplexity_choice_counts_the_same_cost():
    for candidate in DEFAULT_CANDIDATES:
        assert candidate.bits_per_weight == WeightCost(candidate.quantize, candidate.q_group_size).bits_per_weight
    assert Candidate("w4bf16", 64).bits_per_weight == 4 + 24 / 64  # 16-bit scale, 8-bit zero point per 64
