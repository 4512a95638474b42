"""A safetensors folder with a ``quantization_config`` (GPTQ, AWQ GEMM, AutoRound, compressed-tensors
symmetric pack-quantized) -> the model's float
parameters, each packed layer dequantized when it is read.

The quantization config is checked against the tensors before anything is exported: another bit width,
GEMV packing, a packing whose shapes disagree with the config (bits=4 but 8-bit packing) or act-order
without ``g_idx`` is refused with one line naming the layer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ModelError
from .weights import WeightStore, meta_parameter_shapes

log = logging.getLogger(__name__)

PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx",  # GPTQ / AWQ
                   ".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point", ".weight_g_idx")
MARKER = {"gptq": ".qweight", "awq-gemm": ".qweight", "ct-pack": ".weight_packed"}  # the tensor naming a packed layer


@dataclass(frozen=True)
class QuantScheme:
    """The source quantization, as the manifest records it and ``quant_fidelity`` reads it."""

    method: str  # gptq | awq | auto-round | compressed-tensors
    packing: str  # gptq | awq-gemm | ct-pack
    bits: int
    group_size: int  # -1: one group over all input features
    sym: bool
    desc_act: bool  # act-order: input rows grouped by g_idx, not consecutively
    zero_offset: int = 1  # GPTQ classic format stores zero points minus one (gptq_v2: 0)
    checkpoint_format: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def scheme_from_config(qc: dict[str, Any]) -> QuantScheme:
    """quantization_config -> QuantScheme, or one clear line for a scheme tpugraph does not read."""
    method = str(qc.get("quant_method", "")).lower()
    if method in ("intel/auto-round", "auto_round"):
        method = "auto-round"
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(qc)
    if method not in ("gptq", "awq", "auto-round"):
        raise ModelError(f"quantization_config quant_method '{qc.get('quant_method')}' is not supported "
                         "(supported: gptq, awq, auto-round, compressed-tensors pack-quantized, and .gguf files)")
    bits = qc.get("bits", qc.get("w_bit"))
    group_size = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(bits, int) or not isinstance(group_size, int):
        raise ModelError(f"quantization_config ({method}) lacks an integer bits/group_size")
    if method == "awq" or (method == "auto-round" and "awq" in str(qc.get("packing_format") or qc.get("backend") or "")):
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ModelError(f"AWQ '{version}' packing is not supported (only GEMM)")
        if bits != 4:
            raise ModelError(f"AWQ with bits={bits} is not supported (AWQ GEMM packing is 4-bit)")
        if qc.get("zero_point") is False:
            raise ModelError("AWQ with zero_point=false is not supported (GEMM packing stores zero points)")
        return QuantScheme(method, "awq-gemm", bits, group_size, sym=bool(qc.get("sym", False)), desc_act=False,
                           zero_offset=0)
    if bits not in (4, 8):
        raise ModelError(f"{method} with bits={bits} is not supported (4 and 8 bits are)")
    fmt = str(qc.get("checkpoint_format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ModelError(f"{method} checkpoint_format '{fmt}' is not supported (gptq, gptq_v2 are)")
    return QuantScheme(method, "gptq", bits, group_size, sym=bool(qc.get("sym", True)),
                       desc_act=bool(qc.get("desc_act", False)), zero_offset=1 if fmt == "gptq" else 0,
                       checkpoint_format=fmt)


def _compressed_tensors_scheme(qc: dict[str, Any]) -> QuantScheme:
    """compressed-tensors: weight-only, symmetric int4/int8 "pack-quantized", group or channel strategy."""
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise ModelError(f"compressed-tensors format '{fmt}' is not supported (only pack-quantized)")
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if not weights or any(w != weights[0] for w in weights):
        raise ModelError("compressed-tensors config_groups must quantize every target's weights the same way")
    if any(g.get("input_activations") for g in groups):
        raise ModelError("compressed-tensors with quantized activations is not supported (weight-only is)")
    w = weights[0]
    bits, strategy = w.get("num_bits"), w.get("strategy")
    if w.get("type", "int") != "int" or bits not in (4, 8):
        raise ModelError(f"compressed-tensors {w.get('type')} with num_bits={bits} is not supported (int 4/8 are)")
    if not w.get("symmetric", True):
        raise ModelError("compressed-tensors asymmetric weights (weight_zero_point) are not supported (symmetric are)")
    if w.get("actorder"):
        raise ModelError(f"compressed-tensors actorder '{w.get('actorder')}' is not supported")
    if strategy not in ("group", "channel"):
        raise ModelError(f"compressed-tensors strategy '{strategy}' is not supported (group, channel are)")
    group = int(w.get("group_size") or 0) if strategy == "group" else -1
    if strategy == "group" and group <= 0:
        raise ModelError("compressed-tensors group strategy without a group_size")
    return QuantScheme("compressed-tensors", "ct-pack", bits, group, sym=True, desc_act=False, zero_offset=0)


class QuantizedWeights:
    """A WeightStore look-alike: HF parameter names (``X.weight`` for each packed ``X.qweight``), each packed
    layer dequantized to float32 when read; every other tensor as the checkpoint stores it."""

    def __init__(self, raw: WeightStore, scheme: QuantScheme, config):
        self.raw = raw
        self.scheme = scheme
        self._packed: dict[str, str] = {}  # logical "X.weight" -> module prefix "X"
        marker = MARKER[scheme.packing]
        for key in raw.keys():
            if key.endswith(marker):
                self._packed[key[: -len(marker)] + ".weight"] = key[: -len(marker)]
        if not self._packed:
            raise ModelError(f"'{raw.folder}' has a {scheme.method} quantization_config but no packed weights "
                             f"(no *{marker} tensors)")
        self._keys = [k for k in raw.keys() if not k.endswith(PACKED_SUFFIXES)] + list(self._packed)
        self._shapes: dict[str, tuple[int, int]] = {}
        expected = meta_parameter_shapes(config)
        for key, prefix in self._packed.items():
            self._shapes[key] = self._check_layer(prefix, expected.get(key))

    # -- checking ------------------------------------------------------------------------------
    def _shape(self, key: str) -> tuple[int, ...] | None:
        return self.raw.shape_and_dtype(key)[0] if key in self.raw else None

    def _check_layer(self, prefix: str, expected: tuple[int, ...] | None) -> tuple[int, int]:
        s = self.scheme
        if s.packing == "ct-pack":
            return self._check_ct_layer(prefix, expected)
        qweight, qzeros, scales = (self._shape(f"{prefix}{x}") for x in (".qweight", ".qzeros", ".scales"))
        if qzeros is None or scales is None:
            missing = ".qzeros" if qzeros is None else ".scales"
            raise ModelError(f"{prefix}: packed weight without {prefix}{missing}")
        dtype = self.raw.shape_and_dtype(f"{prefix}.qweight")[1]
        if dtype not in ("I32", "U32"):
            raise ModelError(f"{prefix}.qweight is {dtype}, not the int32 the {s.packing} packing uses")
        if expected is None or len(expected) != 2:
            raise ModelError(f"{prefix}: the model has no linear weight '{prefix}.weight' for this packed layer")
        out_f, in_f = expected
        per_int = 32 // s.bits
        if s.packing == "gptq":
            layout = {"qweight": (in_f // per_int, out_f)}
            if qweight[1] != out_f and qweight[0] == out_f:
                raise ModelError(f"{prefix}.qweight is [{qweight[0]}, {qweight[1]}]: transposed for the model's "
                                 f"[{out_f}, {in_f}] weight (GEMV or another packing, not {s.method}'s)")
        else:
            layout = {"qweight": (in_f, out_f // per_int)}
            if qweight[0] == out_f and qweight[1] * per_int == in_f and out_f != in_f:
                raise ModelError(f"{prefix}.qweight is [{qweight[0]}, {qweight[1]}]: AWQ GEMV packing, not GEMM")
        if tuple(qweight) != layout["qweight"]:
            implied = 32 * qweight[0] // in_f if s.packing == "gptq" and in_f else 32 * qweight[1] // max(out_f, 1)
            raise ModelError(
                f"{prefix}.qweight is [{qweight[0]}, {qweight[1]}], but {s.bits}-bit {s.packing} packing of the "
                f"model's [{out_f}, {in_f}] weight is [{layout['qweight'][0]}, {layout['qweight'][1]}] "
                f"(quantization_config says bits={s.bits}; the tensors look {implied}-bit)")
        group = in_f if s.group_size == -1 else s.group_size
        groups = math.ceil(in_f / group)
        if tuple(scales) != (groups, out_f):
            if s.desc_act and scales[1] == out_f:
                groups = scales[0]  # act-order: g_idx decides, the count follows from it
            else:
                raise ModelError(f"{prefix}.scales is {list(scales)}, but group_size={s.group_size} over {in_f} "
                                 f"inputs makes [{groups}, {out_f}] (config and tensors disagree)")
        if tuple(qzeros) != (groups, out_f // per_int):
            raise ModelError(f"{prefix}.qzeros is {list(qzeros)}, expected [{groups}, {out_f // per_int}] for "
                             f"{s.bits}-bit zero points (config and tensors disagree)")
        if s.packing == "gptq":
            g_idx = self._shape(f"{prefix}.g_idx")
            if g_idx is None and s.desc_act:
                raise ModelError(f"{prefix}: desc_act=true (act-order) but the checkpoint has no {prefix}.g_idx")
            if g_idx is not None and tuple(g_idx) != (in_f,):
                raise ModelError(f"{prefix}.g_idx has shape {list(g_idx)}, expected [{in_f}]")
        return out_f, in_f

    def _check_ct_layer(self, prefix: str, expected: tuple[int, ...] | None) -> tuple[int, int]:
        s = self.scheme
        packed, scale = self._shape(f"{prefix}.weight_packed"), self._shape(f"{prefix}.weight_scale")
        if scale is None:
            raise ModelError(f"{prefix}: packed weight without {prefix}.weight_scale")
        if f"{prefix}.weight_zero_point" in self.raw or f"{prefix}.weight_g_idx" in self.raw:
            raise ModelError(f"{prefix}: has a zero point or g_idx, but the config says symmetric without actorder")
        if expected is None or len(expected) != 2:
            raise ModelError(f"{prefix}: the model has no linear weight '{prefix}.weight' for this packed layer")
        out_f, in_f = expected
        per_int = 32 // s.bits
        want = (out_f, math.ceil(in_f / per_int))
        if tuple(packed) != want:
            implied = 32 * packed[1] // in_f if in_f else "?"
            raise ModelError(f"{prefix}.weight_packed is {list(packed)}, but {s.bits}-bit packing of the model's "
                             f"[{out_f}, {in_f}] weight is {list(want)} (quantization_config says num_bits={s.bits}; "
                             f"the tensors look {implied}-bit)")
        groups = 1 if s.group_size == -1 else math.ceil(in_f / s.group_size)
        if tuple(scale) != (out_f, groups):
            raise ModelError(f"{prefix}.weight_scale is {list(scale)}, but group_size={s.group_size} over {in_f} "
                             f"inputs makes [{out_f}, {groups}] (config and tensors disagree)")
        return out_f, in_f

    # -- the WeightStore interface -------------------------------------------------------------
    @property
    def quantization(self) -> dict[str, Any]:
        return {**self.scheme.to_json(), "layers": len(self._packed)}

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._packed or (key in self.raw and not key.endswith(PACKED_SUFFIXES))

    def shape_and_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        if key in self._packed:
            return self._shapes[key], "F32"
        return self.raw.shape_and_dtype(key)

    def is_packed(self, key: str) -> bool:
        return key in self._packed

    def get(self, key: str):
        prefix = self._packed.get(key)
        if prefix is None:
            return self.raw.get(key)
        return dequantize_layer(self.raw, prefix, self.scheme, self._shapes[key])

    def integers(self, key: str):
        """(q [in, out], zeros [groups, out], scales [groups, out] float32, g_idx [in]) of a packed layer."""
        return layer_integers(self.raw, self._packed[key], self.scheme, self._shapes[key])


def _g_idx(raw: WeightStore, prefix: str, scheme: QuantScheme, in_f: int):
    import torch

    if scheme.packing == "gptq" and f"{prefix}.g_idx" in raw:
        return raw.get(f"{prefix}.g_idx").to(torch.long)
    group = in_f if scheme.group_size == -1 else scheme.group_size
    return torch.arange(in_f) // group


def layer_integers(raw: WeightStore, prefix: str, scheme: QuantScheme, shape: tuple[int, int]):
    import torch

    from .dequantize import awq_integers, compressed_tensors_integers, gptq_integers

    if scheme.packing == "ct-pack":
        q = compressed_tensors_integers(raw.get(f"{prefix}.weight_packed"), scheme.bits, shape[1])
        scales = raw.get(f"{prefix}.weight_scale").to(torch.float32).t().contiguous()
        return q.t(), torch.zeros_like(scales, dtype=torch.int32), scales, _g_idx(raw, prefix, scheme, shape[1])

    qweight, qzeros = raw.get(f"{prefix}.qweight"), raw.get(f"{prefix}.qzeros")
    if scheme.packing == "gptq":
        q, zeros = gptq_integers(qweight, qzeros, scheme.bits, scheme.zero_offset)
    else:
        q, zeros = awq_integers(qweight, qzeros, scheme.bits)
    scales = raw.get(f"{prefix}.scales").to(torch.float32)
    return q, zeros, scales, _g_idx(raw, prefix, scheme, shape[1])


def dequantize_layer(raw: WeightStore, prefix: str, scheme: QuantScheme, shape: tuple[int, int]):
    from .dequantize import dequantize_awq, dequantize_compressed_tensors, dequantize_gptq

    if scheme.packing == "ct-pack":
        group = shape[1] if scheme.group_size == -1 else scheme.group_size
        return dequantize_compressed_tensors(raw.get(f"{prefix}.weight_packed"), raw.get(f"{prefix}.weight_scale"),
                                             scheme.bits, group, shape[1])
    qweight, qzeros, scales = (raw.get(f"{prefix}{x}") for x in (".qweight", ".qzeros", ".scales"))
    try:
        if scheme.packing == "gptq":
            g_idx = _g_idx(raw, prefix, scheme, shape[1])
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]:
                raise ModelError(f"{prefix}.g_idx names groups outside 0..{scales.shape[0] - 1}")
            w = dequantize_gptq(qweight, qzeros, scales, g_idx, scheme.bits, scheme.zero_offset)
        else:
            group = shape[1] if scheme.group_size == -1 else scheme.group_size
            w = dequantize_awq(qweight, qzeros, scales, group, scheme.bits)
    except (RuntimeError, IndexError) as exc:
        raise ModelError(f"{prefix}: cannot dequantize ({scheme.packing}): {str(exc).splitlines()[0]}") from None
    if tuple(w.shape) != tuple(shape):
        raise ModelError(f"{prefix}: dequantized to {list(w.shape)}, the model expects {list(shape)}")
    return w
