"""A model's rotary module -> constant cos/sin tables the segments look up by position_ids: plain, Qwen2-VL's
multimodal (mrope sections) and Qwen3-VL's interleaved multimodal rotary."""

from __future__ import annotations

import torch
from torch import nn


class RotaryTable(nn.Module):
    """cos/sin for positions 0..SEQ-1 baked in as constants; looked up by position_ids (a Gather)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("cos", cos.to(dtype).contiguous(), persistent=False)
        self.register_buffer("sin", sin.to(dtype).contiguous(), persistent=False)

    @classmethod
    def from_hf(cls, rotary: nn.Module, seq: int, dtype: torch.dtype = torch.float32, **call_kwargs) -> "RotaryTable":
        """Ask the model's own rotary module for positions 0..SEQ-1 (in float32, cast like HF casts it)."""
        pos = torch.arange(seq, dtype=torch.long)[None]
        probe = torch.zeros(1, seq, 1, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = rotary(probe, pos, **call_kwargs)
        return cls(cos[0], sin[0], dtype)

    def forward(self, position_ids: torch.Tensor):
        return self.cos[position_ids], self.sin[position_ids]


class MropeRotaryTable(RotaryTable):
    """Qwen2-VL's multimodal rotary: position_ids [3, L] (temporal, height, width rows) -> cos/sin [1, L, D].

    The lanes of each half of the head dim are split by ``mrope_section``; section i reads row i % 3 (as
    transformers' recomposition does). A text token has three equal rows, which gives the plain rotary. Static:
    one Gather per table, then a Slice per section and a Concat.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, sections: tuple[int, ...]):
        super().__init__(cos, sin, cos.dtype)
        half = int(cos.shape[-1]) // 2
        if sum(sections) != half:
            raise ValueError(f"mrope_section {list(sections)} does not cover half the head dim ({half})")
        self.lanes: list[tuple[int, int, int]] = []  # (row, first lane, end lane)
        for offset in (0, half):
            start = offset
            for i, width in enumerate(sections):
                self.lanes.append((i % 3, start, start + width))
                start += width

    @classmethod
    def of(cls, table: RotaryTable, sections: tuple[int, ...]) -> "MropeRotaryTable":
        return cls(table.cos, table.sin, tuple(sections))

    def _pick(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows[row:row + 1, :, start:end] for row, start, end in self.lanes], dim=-1)

    def forward(self, position_ids: torch.Tensor):
        return self._pick(self.cos[position_ids]), self._pick(self.sin[position_ids])


class InterleavedMropeRotaryTable(RotaryTable):
    """Qwen3-VL's interleaved multimodal rotary: position_ids [3, L] -> cos/sin [1, L, D], lane j of each half of
    the head dim reading row 1 when j % 3 == 1 and j < 3 * section[1], row 2 when j % 3 == 2 and
    j < 3 * section[2], else row 0 (transformers' ``recomposition_frequencies``). Static: one Gather per table,
    then one Gather of the D lanes out of the three rows laid side by side (llm_convert's mrope_interleave_idx)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, sections: tuple[int, ...]):
        super().__init__(cos, sin, cos.dtype)
        dim = int(cos.shape[-1])
        half = dim // 2
        if len(sections) != 3:
            raise ValueError(f"interleaved mrope takes 3 sections (t, h, w), not {list(sections)}")
        rows = [0] * half
        for row in (1, 2):
            for lane in range(row, min(3 * sections[row], half), 3):  # a slice of the half, as transformers'
                rows[lane] = row
        lanes = [rows[j % half] * dim + j for j in range(dim)]
        self.register_buffer("lanes", torch.tensor(lanes, dtype=torch.long), persistent=False)

    @classmethod
    def of(cls, table: RotaryTable, sections: tuple[int, ...]) -> "InterleavedMropeRotaryTable":
        return cls(table.cos, table.sin, tuple(sections))

    def _pick(self, rows: torch.Tensor) -> torch.Tensor:
        three, length, dim = rows.shape  # [3, L, D] -> [L, 3*D] -> the D lanes [1, L, D]
        side = rows.permute(1, 0, 2).reshape(length, three * dim)
        return torch.index_select(side, 1, self.lanes).unsqueeze(0)

    def forward(self, position_ids: torch.Tensor):
        return self._pick(self.cos[position_ids]), self._pick(self.sin[position_ids])
