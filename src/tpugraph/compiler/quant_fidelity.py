"""A pre-quantized source + tpu-mlir's weight-only re-quantization -> the compile mode that keeps the
checkpoint's own integers best, and how faithfully it does.

tpu-mlir (``A16MatMulAdjust``, BM1684X) re-quantizes every MatMul weight of a W4/W8 deploy from the float
weights in the ONNX files, per output row in groups of ``q_group_size`` consecutive input features
(0: the whole row):

- asymmetric: ``scale = max(max - min, 1e-5) / (2^bits - 1)``, ``zp = clamp(-round(min / scale), 0, 2^bits - 1)``;
- ``--q_symmetric``: ``scale = 2 * absmax / (2^bits - 1)``, ``zp = 8`` (4-bit) or ``128`` (8-bit);

then ``q = clamp(round(w / scale) + zp, 0, 2^bits - 1)`` in float32 with C's round (half away from zero),
and the chip computes ``(q - zp) * scale`` with the scale stored in the deploy's half type (F16 / BF16).

A checkpoint survives exactly when every group of the re-quantization lines up with one of its own groups
and spans its integer range: the same scale and integers come back. This module simulates that rounding
on the dequantized checkpoint and reports, per choice, the share of groups reproduced exactly and the
extra weight error (RMS of chip weight - checkpoint weight) relative to the checkpoint's own quantization
error (its grid step / sqrt(12) RMS, the error of rounding to that grid).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.manifest_records import GgufQuantization, PackedQuantization, read_quantization
from ..errors import ModelError

log = logging.getLogger(__name__)

GGUF_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 8, "Q5_1": 8, "Q5_K": 8, "Q6_K": 8, "Q8_0": 8}
GGUF_GROUP = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16}
HALF_TYPES = ("f16", "bf16")


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's std::round (numpy's round goes half to even)."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def to_half(x: np.ndarray, half: str) -> np.ndarray:
    """float32 -> the deploy's half type -> float32 (bf16: round to nearest even on the top 16 bits)."""
    if half == "f16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def tpu_mlir_quantize(w: np.ndarray, bits: int, group: int, symmetric: bool):
    """tpu-mlir's integers for a weight [out, in]: q [out, in] (0..2^bits-1), the float32 scale and the zero
    point of each group [out, groups] (before the scale is stored in the half type)."""
    w = np.asarray(w, np.float32)
    out_f, in_f = w.shape
    size = in_f if group == 0 else group
    if in_f % size:
        raise ValueError(f"q_group_size {group} does not divide {in_f} input features")
    g = w.reshape(out_f, in_f // size, size)
    max_int = np.float32(2 ** bits - 1)
    if symmetric:
        scale = np.float32(2) * np.abs(g).max(axis=2, keepdims=True) / max_int
        zp = np.full_like(scale, np.float32(8 if bits == 4 else 128))
    else:
        lo, hi = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
        scale = np.maximum(hi - lo, np.float32(1e-5)) / max_int
        zp = np.clip(-round_half_away(lo / scale), 0, max_int)
    safe = np.where(scale == 0, np.float32(1), scale)
    q = np.clip(round_half_away(g / safe) + zp, 0, max_int)
    return q.reshape(out_f, in_f).astype(np.uint8), scale[:, :, 0], zp[:, :, 0].astype(np.uint8)


def tpu_mlir_requantize(w: np.ndarray, bits: int, group: int, symmetric: bool, half: str = "f16") -> np.ndarray:
    """The weight [out, in] as the chip computes with it after tpu-mlir's per-group re-quantization."""
    q, scale, zp = tpu_mlir_quantize(w, bits, group, symmetric)
    out_f, in_f = q.shape
    groups = scale.shape[1]
    levels = q.reshape(out_f, groups, -1).astype(np.float32) - zp[:, :, None].astype(np.float32)
    return (levels * to_half(scale, half)[:, :, None]).reshape(out_f, in_f).astype(np.float32)


@dataclass
class FidelityFigure:
    """How one re-quantization choice reproduces the checkpoint."""

    symmetric: bool
    groups: int = 0
    exact_groups: int = 0
    sq_extra: float = 0.0  # sum of squared (chip weight - checkpoint weight)
    sq_own: float = 0.0  # sum of squared own-error estimates (step^2 / 12 per element)
    elements: int = 0

    @property
    def exact_share(self) -> float:
        return self.exact_groups / self.groups if self.groups else float("nan")

    @property
    def extra_error_ratio(self) -> float:
        """RMS extra error / RMS of the checkpoint's own quantization error (0: reproduced exactly)."""
        return math.sqrt(self.sq_extra / self.sq_own) if self.sq_own else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"symmetric": self.symmetric, "groups": self.groups, "exact_groups": self.exact_groups,
                "exact_share": self.exact_share, "extra_error_ratio": self.extra_error_ratio}


@dataclass
class CompileChoice:
    """What ``compile --quantize auto`` should use for a quantized source, and why."""

    quantize: str  # w4f16 | w8f16 | ... (the weight-only mode matching the checkpoint's bits)
    q_group_size: int  # 0: per channel (tpu-mlir's default for q_group_size 0)
    q_symmetric: bool  # the better of the two re-quantizations for this checkpoint
    method: str
    asymmetric: FidelityFigure
    symmetric: FidelityFigure
    tensors: list[str] = field(default_factory=list)  # the checkpoint tensors measured
    notes: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> FidelityFigure:
        return self.symmetric if self.q_symmetric else self.asymmetric

    def summary(self) -> str:
        f = self.chosen
        group = f"group {self.q_group_size}" if self.q_group_size else "per channel"
        return (f"{self.method} checkpoint -> --quantize {self.quantize} ({group}, "
                f"{'symmetric' if self.q_symmetric else 'asymmetric'}): {100 * f.exact_share:.1f}% of "
                f"{f.groups} groups reproduce the checkpoint's integers exactly; extra weight error "
                f"{f.extra_error_ratio:.3f}x the checkpoint's own quantization error "
                f"(the other choice: {100 * self.other.exact_share:.1f}%, {self.other.extra_error_ratio:.3f}x)")

    @property
    def other(self) -> FidelityFigure:
        return self.asymmetric if self.q_symmetric else self.symmetric

    def compile_args(self) -> list[str]:
        """The arguments for tpugraph compile / compile-script."""
        args = ["--quantize", self.quantize]
        if self.q_group_size:
            args += ["--q-group-size", str(self.q_group_size)]
        return args

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["asymmetric"], d["symmetric"] = self.asymmetric.to_json(), self.symmetric.to_json()
        d["summary"] = self.summary()
        return d


def _grid_step(w: np.ndarray, block: int) -> np.ndarray:
    """Per element, the quantization step of its block estimated from the values: the smallest positive
    gap between two of the block's distinct values (its scale whenever two adjacent levels occur)."""
    out_f, in_f = w.shape
    g = np.sort(w.reshape(out_f, in_f // block, block), axis=2)
    gaps = np.diff(g, axis=2)
    gaps = np.where(gaps > 0, gaps, np.inf).min(axis=2, keepdims=True)
    gaps = np.where(np.isfinite(gaps), gaps, 0)
    return np.broadcast_to(gaps, (out_f, in_f // block, block)).reshape(out_f, in_f)


def _accumulate(fig: FidelityFigure, ckpt: np.ndarray, step: np.ndarray, bits: int, group: int, half: str) -> None:
    chip = tpu_mlir_requantize(ckpt, bits, group, fig.symmetric, half)
    out_f, in_f = ckpt.shape
    size = in_f if group == 0 else group
    diff = (chip - ckpt).astype(np.float64)
    tolerance = 1e-3 * np.maximum(step, 1e-30)  # float rounding of the same value
    exact = (np.abs(diff) <= tolerance).reshape(out_f, in_f // size, size).all(axis=2)
    fig.groups += exact.size
    fig.exact_groups += int(exact.sum())
    fig.sq_extra += float((diff ** 2).sum())
    fig.sq_own += float((step.astype(np.float64) ** 2).sum() / 12)
    fig.elements += diff.size


def _sample(keys: list[str], layers_path: str, sample_layers: int | None) -> list[str]:
    """The keys of ``sample_layers`` evenly spread decoder layers (first and last included), or all keys."""
    import re

    pattern = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.")
    indices = sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})
    if sample_layers is None or len(indices) <= sample_layers:
        return keys
    picked = {indices[round(i * (len(indices) - 1) / (sample_layers - 1))] for i in range(sample_layers)} \
        if sample_layers > 1 else {indices[0]}
    return [k for k in keys if (m := pattern.match(k)) is None or int(m.group(1)) in picked]


def measure_source(weights, quantization: PackedQuantization | GgufQuantization | dict[str, Any],
                   layers_path: str = "model.layers", sample_layers: int | None = 4, half: str = "f16") -> CompileChoice:
    """Measure both re-quantizations of a quantized source's weights (``checkpoint.open_weights``) and
    choose the compile mode. ``quantization``: the manifest's record (or the weights' own ``quantization``).
    ``sample_layers``: measure this many decoder layers (None: all)."""
    if isinstance(quantization, dict):
        quantization = read_quantization(quantization)
    method = quantization.method
    if isinstance(quantization, GgufQuantization):
        types = {k: t for k, t in quantization.tensor_types.items() if t in GGUF_BITS and "embed_tokens" not in k}
        if not types:
            raise ModelError("the GGUF source has no quantized matrices (all float): compile it with f16/bf16")
        dominant = max(set(types.values()), key=list(types.values()).count)
        bits, group = GGUF_BITS[dominant], GGUF_GROUP[dominant]
        keys = sorted(types)
        notes = [f"GGUF tensors mostly {dominant}: W{bits} with groups of {group} (its block size)"]
        if dominant.startswith("Q5") or dominant.startswith("Q6"):
            notes.append(f"{dominant} has more levels than W4 holds: W8 keeps it (not exactly: a finer grid)")
    elif method in ("gptq", "awq", "auto-round", "compressed-tensors"):
        bits, group = int(quantization.bits), int(quantization.group_size)
        group = 0 if group == -1 else group
        keys = sorted(k for k in weights.keys() if getattr(weights, "is_packed", lambda _k: False)(k))
        notes = []
        if quantization.desc_act:
            notes.append("act-order (desc_act): the checkpoint's groups are not consecutive input features, so "
                         "no q_group_size lines up with them")
    else:
        raise ModelError(f"the source quantization '{method}' is not one tpugraph measures")
    keys = _sample(keys, layers_path, sample_layers)
    asym, sym = FidelityFigure(False), FidelityFigure(True)
    for key in keys:
        ckpt = weights.get(key).numpy().astype(np.float32)
        if method == "gguf":
            step = _grid_step(ckpt, GGUF_GROUP.get(quantization.tensor_types[key], 32))
        else:
            q, zeros, scales, g_idx = weights.integers(key)
            step = scales.numpy()[g_idx.numpy()].T  # [out, in]: each element's own scale
        if ckpt.shape[1] % (group or ckpt.shape[1]):
            notes.append(f"{key}: {ckpt.shape[1]} inputs are not a multiple of {group}; not measured")
            continue
        for fig in (asym, sym):
            _accumulate(fig, ckpt, step, bits, group, half)
    # The better one adds less weight error (a choice that reproduces every group adds none).
    symmetric = (sym.extra_error_ratio, -sym.exact_share) < (asym.extra_error_ratio, -asym.exact_share)
    return CompileChoice(quantize=f"w{bits}{half}", q_group_size=group, q_symmetric=symmetric, method=method,
                         asymmetric=asym, symmetric=sym, tensors=keys, notes=notes)


def choose_compile_mode(out: str | Path, model_path: str | None = None, sample_layers: int | None = 4,
                        half: str = "f16") -> CompileChoice | None:
    """For OUT exported from a quantized source: the compile mode ``--quantize auto`` should use and the
    fidelity figure to print. None when the source was not quantized (auto then means the usual default)."""
    from ..contract.manifest import read_manifest
    from ..source.checkpoint import load_config, open_weights, resolve_model

    manifest = read_manifest(Path(out))
    quantization = manifest.model.source_quantization
    if not quantization:
        return None
    source = resolve_model(model_path or manifest.model.source.path)
    config, family = load_config(source)
    weights = open_weights(source, config)
    choice = measure_source(weights, quantization, family.layers_path, sample_layers, half)
    log.info("%s", choice.summary())
    return choice
