"""Packed integer weights of a GPTQ / AWQ / AutoRound checkpoint -> the float weight they stand for.

Each function takes one linear layer's packed tensors as the checkpoint stores them and returns the
weight in Hugging Face's [out_features, in_features] layout, in float32: ``scale * (q - zero)``, with
the integers exact and one rounding (the product in float32). The formulas are the formats' own:

- GPTQ (AutoGPTQ / gptqmodel, also AutoRound's GPTQ packing): ``qweight`` int32 [in / (32/bits), out]
  packs consecutive *input* rows, lowest bits first; ``qzeros`` int32 [groups, out / (32/bits)] packs
  consecutive *output* columns the same way; ``scales`` [groups, out]; ``g_idx`` [in] names the group of
  each input row (act-order reorders them; without it ``g_idx[i] = i // group_size``). The classic
  checkpoint format stores each zero point minus one, so its readers add one back (without masking:
  a stored 15 of a 4-bit zero reads as 16, as AutoGPTQ's kernels read it); ``gptq_v2`` stores it as is.
- AWQ GEMM (AutoAWQ, also AutoRound's AWQ packing): ``qweight`` int32 [in, out / 8] and ``qzeros``
  int32 [groups, out / 8] pack eight *output* columns each in AWQ's interleaved order (nibble ``i``
  holds column ``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of its eight); ``scales`` [groups, out]; groups are
  consecutive runs of ``group_size`` input rows; zeros are stored as they are.
- compressed-tensors pack-quantized (symmetric): ``weight_packed`` int32 [out, in / (32/bits)] packs
  consecutive *input* columns, lowest bits first, each value stored plus ``2^(bits-1)`` (unsigned);
  ``weight_scale`` [out, groups]; no zero point: ``w = scale * q``.
"""

from __future__ import annotations

import torch

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed int32 holds column AWQ_PACK_ORDER[i]


def unpack_along_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int32 [R * 32/bits, C]: each int32 holds 32/bits consecutive rows, lowest bits first."""
    per_int = 32 // bits
    shifts = torch.arange(per_int, dtype=torch.int32) * bits
    values = (packed.to(torch.int32).unsqueeze(1) >> shifts.view(1, per_int, 1)) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0] * per_int, packed.shape[1])


def unpack_along_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, C * 32/bits]: each int32 holds 32/bits consecutive columns, lowest bits first."""
    per_int = 32 // bits
    shifts = torch.arange(per_int, dtype=torch.int32) * bits
    values = (packed.to(torch.int32).unsqueeze(2) >> shifts.view(1, 1, per_int)) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], packed.shape[1] * per_int)


def gptq_integers(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, zero_offset: int):
    """The quantized integers [in, out] and zero points [groups, out] of a GPTQ layer."""
    return unpack_along_rows(qweight, bits), unpack_along_columns(qzeros, bits) + zero_offset


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, zero_offset: int = 1) -> torch.Tensor:
    """GPTQ layer -> float32 weight [out, in]. ``zero_offset`` 1 for the classic format, 0 for gptq_v2."""
    q, zeros = gptq_integers(qweight, qzeros, bits, zero_offset)
    groups = g_idx.to(torch.long)
    w = scales.to(torch.float32)[groups] * (q - zeros[groups]).to(torch.float32)
    return w.t().contiguous()


def awq_integers(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int = 4):
    """The quantized integers [in, out] and zero points [groups, out] of an AWQ GEMM layer (columns in order)."""
    if bits != 4:
        raise ValueError("AWQ GEMM packing is 4-bit")
    inverse = torch.tensor([AWQ_PACK_ORDER.index(c) for c in range(8)])

    def in_order(packed: torch.Tensor) -> torch.Tensor:
        nibbles = unpack_along_columns(packed, bits).view(packed.shape[0], -1, 8)
        return nibbles[:, :, inverse].reshape(packed.shape[0], -1)

    return in_order(qweight), in_order(qzeros)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   bits: int = 4) -> torch.Tensor:
    """AWQ GEMM layer -> float32 weight [out, in]."""
    q, zeros = awq_integers(qweight, qzeros, bits)
    groups = torch.arange(q.shape[0]) // group_size
    w = scales.to(torch.float32)[groups] * (q - zeros[groups]).to(torch.float32)
    return w.t().contiguous()


def compressed_tensors_integers(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The signed integers [out, in] of a compressed-tensors pack-quantized weight."""
    return unpack_along_columns(packed, bits)[:, :in_features] - (1 << (bits - 1))


def dequantize_compressed_tensors(packed: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int,
                                  in_features: int) -> torch.Tensor:
    """compressed-tensors symmetric pack-quantized weight -> float32 [out, in]."""
    q = compressed_tensors_integers(packed, bits, in_features)
    groups = torch.arange(in_features) // group_size
    return (scale.to(torch.float32)[:, groups] * q.to(torch.float32)).contiguous()
