"""A compile mode and group size -> what a matmul weight costs in the bmodel (bytes of a matrix, bits per weight).

The one cost the memory plan (memory_plan.py) and the perplexity choice (ppl_choice.py) count with. It is tpu-mlir
1.30.2's layout of a weight-only quantized matmul (tpu.A16MatMul), read from ``model_tool --weight`` on bmodels of one
[4096 -> 1024] MatMul deployed for bm1684x in each mode (2026-12-04):

- the integers: half a byte (W4, two to a byte) or one byte (W8) per element;
- per group of ``q_group_size`` elements along a row's input width, a scale in the mode's float type (2 bytes) and
  a zero point of one byte (uint8) -- also with ``--q_symmetric``, which fills the zero points with 8 (W4) or 128
  (W8) instead of dropping them;
- model_deploy.py's ``--q_group_size`` defaults to 64 for the W4 *and* W8 modes, so a W8 compile without a group
  size is grouped by 64, not per channel;
- a matrix whose input width the group does not divide is not quantized: tpu-mlir keeps it in the float type
  (a [160 -> 1024] MatMul in W4BF16 or W8BF16, group 64, deploys as a BF16 MatMul).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLOAT_BYTES = 2  # f16 / bf16
SCALE_BYTES = 2  # one scale per group, in the mode's float type
ZERO_POINT_BYTES = 1  # one uint8 zero point per group, symmetric or not
TOOL_GROUP_SIZE = 64  # model_deploy.py --q_group_size's default (W4 and W8 modes)


@dataclass(frozen=True)
class WeightCost:
    """How one compile mode stores a matmul weight [rows (out), cols (in)]."""

    quantize: str  # f16, bf16, w8bf16, w4bf16, w8f16, w4f16
    q_group_size: int | None = None  # None: model_deploy's default (TOOL_GROUP_SIZE)

    @property
    def quantized(self) -> bool:
        return self.quantize.lower().startswith("w")

    @property
    def bits(self) -> int:
        """Bits of one element: 4 or 8 in the weight-only modes, 16 in the float modes."""
        return int(self.quantize[1]) if self.quantized else 8 * FLOAT_BYTES

    @property
    def group(self) -> int | None:
        """Elements sharing a scale and a zero point (None in the float modes)."""
        return (self.q_group_size or TOOL_GROUP_SIZE) if self.quantized else None

    def is_quantized(self, cols: int) -> bool:
        """Whether tpu-mlir quantizes a matrix of this input width (the group must divide it)."""
        return self.quantized and cols % self.group == 0

    def bytes(self, rows: int, cols: int) -> int:
        """Bytes of a [rows, cols] matmul weight (cols: its input width, along which the groups run)."""
        if not self.is_quantized(cols):
            return rows * cols * FLOAT_BYTES
        groups = rows * (cols // self.group)
        return math.ceil(rows * cols * self.bits / 8) + groups * (SCALE_BYTES + ZERO_POINT_BYTES)

    @property
    def bits_per_weight(self) -> float:
        """Bits one weight costs in a matrix the group divides: its integer plus its share of the group's scale
        and zero point (16 in the float modes)."""
        if not self.quantized:
            return float(self.bits)
        return self.bits + 8 * (SCALE_BYTES + ZERO_POINT_BYTES) / self.group
