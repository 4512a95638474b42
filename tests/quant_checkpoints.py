"""Quantized checkpoints built in code, and an independent reading of each format.

Everything here is written from the formats' descriptions, in numpy, apart from tpugraph's own torch
code: a tiny random Llama's linear weights are quantized per group, packed the way AutoGPTQ/gptqmodel
(GPTQ), AutoAWQ (AWQ GEMM) and AutoRound pack them, and saved with a ``quantization_config``; the
reference dequantizer reads the packed integers back bit by bit. GGUF files are written with the gguf
package's writer (its quantizer for the types it has one for, hand-made blocks for the K-quants).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conftest import build_model_dir

TINY_Q = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@dataclass(frozen=True)
class Variant:
    method: str  # gptq | awq | auto-round
    bits: int
    group_size: int
    sym: bool
    desc_act: bool = False
    packing: str = "gptq"  # gptq | awq | ct (compressed-tensors pack-quantized)
    checkpoint_format: str = "gptq"  # gptq (zeros stored minus one) | gptq_v2

    @property
    def name(self) -> str:
        act = "-act" if self.desc_act else ""
        return f"{self.method}-{self.packing}-w{self.bits}-g{self.group_size}-{'sym' if self.sym else 'asym'}{act}"

    def quantization_config(self) -> dict:
        if self.method == "compressed-tensors":
            strategy = "channel" if self.group_size == -1 else "group"
            weights = {"num_bits": self.bits, "type": "int", "symmetric": True, "strategy": strategy,
                       "group_size": None if self.group_size == -1 else self.group_size, "actorder": None}
            return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                  "input_activations": None}}}
        if self.method == "awq":
            return {"quant_method": "awq", "bits": self.bits, "group_size": self.group_size, "zero_point": True,
                    "version": "gemm"}
        qc = {"quant_method": self.method, "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
              "desc_act": self.desc_act}
        if self.method == "auto-round":
            qc["packing_format"] = "auto_round:auto_awq" if self.packing == "awq" else "auto_round:auto_gptq"
        if self.checkpoint_format != "gptq":
            qc["checkpoint_format"] = self.checkpoint_format
        return qc


def quantize_groups(w: np.ndarray, groups: np.ndarray, n_groups: int, bits: int, sym: bool):
    """w [out, in] float32, groups [in] -> q [in, out] ints, zeros [G, out] ints, scales [G, out] float16."""
    maxq = 2 ** bits - 1
    out_f, in_f = w.shape
    scales = np.zeros((n_groups, out_f), np.float16)
    zeros = np.zeros((n_groups, out_f), np.int64)
    q = np.zeros((in_f, out_f), np.int64)
    for g in range(n_groups):
        cols = np.nonzero(groups == g)[0]
        block = w[:, cols]
        lo = np.minimum(block.min(axis=1), 0)
        hi = np.maximum(block.max(axis=1), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = -hi
        scale = ((hi - lo) / maxq).astype(np.float16)
        scale[scale == 0] = 1
        zero = np.full(out_f, (maxq + 1) // 2) if sym else np.clip(np.round(-lo / scale.astype(np.float32)), 1, maxq)
        scales[g], zeros[g] = scale, zero
        q[cols] = np.clip(np.round(block / scale.astype(np.float32)[:, None]) + zero[:, None], 0, maxq).T
    return q, zeros, scales


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] small ints -> int32 [R / (32/bits), C]: consecutive rows in one int32, first row lowest."""
    per = 32 // bits
    out = np.zeros((values.shape[0] // per, values.shape[1]), np.uint32)
    for r in range(out.shape[0]):
        for j in range(per):
            out[r] |= (values[r * per + j].astype(np.uint32) & (2 ** bits - 1)) << np.uint32(bits * j)
    return out.view(np.int32)


def pack_cols(values: np.ndarray, bits: int, order: list[int] | None = None) -> np.ndarray:
    """[R, C] small ints -> int32 [R, C / (32/bits)]: slot j of int32 c holds column c*per + order[j]."""
    per = 32 // bits
    order = order or list(range(per))
    out = np.zeros((values.shape[0], values.shape[1] // per), np.uint32)
    for c in range(out.shape[1]):
        for j in range(per):
            out[:, c] |= (values[:, c * per + order[j]].astype(np.uint32) & (2 ** bits - 1)) << np.uint32(bits * j)
    return out.view(np.int32)


def unpack_slot(packed: np.ndarray, bits: int, j: int) -> np.ndarray:
    return ((packed.view(np.uint32) >> np.uint32(bits * j)) & np.uint32(2 ** bits - 1)).astype(np.int64)


def reference_dequantize(tensors: dict[str, np.ndarray], prefix: str, v: Variant, in_f: int, out_f: int) -> np.ndarray:
    """The format's own reading of one packed layer -> float32 weight [out, in], element by element slots."""
    per = 32 // v.bits
    if v.packing == "ct":
        packed, scale = tensors[f"{prefix}.weight_packed"], tensors[f"{prefix}.weight_scale"].astype(np.float32)
        q = np.zeros((out_f, packed.shape[1] * per), np.int64)
        for j in range(per):
            q[:, j::per] = unpack_slot(packed, v.bits, j)
        q = q[:, :in_f] - 2 ** (v.bits - 1)
        group = in_f if v.group_size == -1 else v.group_size
        w = np.empty((out_f, in_f), np.float32)
        for i in range(in_f):
            w[:, i] = scale[:, i // group] * q[:, i].astype(np.float32)
        return w
    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    scales = tensors[f"{prefix}.scales"].astype(np.float32)
    q = np.zeros((in_f, out_f), np.int64)
    z = np.zeros((qzeros.shape[0], out_f), np.int64)
    if v.packing == "awq":
        for j in range(per):
            q[:, AWQ_ORDER[j]::per] = unpack_slot(qweight, v.bits, j)
            z[:, AWQ_ORDER[j]::per] = unpack_slot(qzeros, v.bits, j)
        g_idx = np.arange(in_f) // v.group_size
    else:
        for j in range(per):
            q[j::per, :] = unpack_slot(qweight, v.bits, j)
            z[:, j::per] = unpack_slot(qzeros, v.bits, j)
        if v.checkpoint_format == "gptq":
            z = z + 1
        g_idx = tensors[f"{prefix}.g_idx"].astype(np.int64)
    w = np.empty((out_f, in_f), np.float32)
    for i in range(in_f):
        w[:, i] = scales[g_idx[i]] * (q[i] - z[g_idx[i]]).astype(np.float32)
    return w


def write_quantized(folder: Path, v: Variant, seed: int = 0, **config) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny random Llama saved with its linear layers quantized and packed per ``v`` (config.json with
    quantization_config + model.safetensors). Returns the folder and the tensors written."""
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    float_dir = build_model_dir(folder.parent / f"{folder.name}-float", "llama", seed=seed, **{**TINY_Q, **config})
    from safetensors.numpy import load_file

    state = load_file(str(float_dir / "model.safetensors"))
    cfg = AutoConfig.from_pretrained(float_dir)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for key, value in state.items():
        prefix = key[: -len(".weight")] if key.endswith(".weight") else None
        if prefix is None or not any(prefix.endswith(l) for l in LINEARS):
            tensors[key] = value
            continue
        w = value.astype(np.float32)
        out_f, in_f = w.shape
        group = in_f if v.group_size == -1 else v.group_size
        n_groups = in_f // group
        if v.desc_act:
            perm = rng.permutation(in_f)  # the order act-order quantized the columns in
            groups = np.empty(in_f, np.int64)
            groups[perm] = np.arange(in_f) // group
        else:
            groups = np.arange(in_f) // group
        if v.packing == "ct":  # symmetric signed ints, stored unsigned (+2^(bits-1)), packed along the input
            half = 2 ** (v.bits - 1)
            g = w.reshape(out_f, n_groups, group)
            scale = (np.abs(g).max(axis=2) / (half - 0.5)).astype(np.float16)
            q = np.clip(np.round(g / scale.astype(np.float32)[:, :, None]), -half, half - 1).reshape(out_f, in_f)
            tensors[f"{prefix}.weight_packed"] = pack_cols(q + half, v.bits)
            tensors[f"{prefix}.weight_scale"] = scale
            tensors[f"{prefix}.weight_shape"] = np.array([out_f, in_f], np.int64)
            continue
        q, zeros, scales = quantize_groups(w, groups, n_groups, v.bits, v.sym)
        if v.packing == "awq":
            tensors[f"{prefix}.qweight"] = pack_cols(q, v.bits, AWQ_ORDER)
            tensors[f"{prefix}.qzeros"] = pack_cols(zeros, v.bits, AWQ_ORDER)
        else:
            stored = zeros - 1 if v.checkpoint_format == "gptq" else zeros
            tensors[f"{prefix}.qweight"] = pack_rows(q, v.bits)
            tensors[f"{prefix}.qzeros"] = pack_cols(stored, v.bits)
            tensors[f"{prefix}.g_idx"] = groups.astype(np.int32)
        tensors[f"{prefix}.scales"] = scales
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((float_dir / "config.json").read_text())
    raw["quantization_config"] = v.quantization_config()
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    del torch, cfg
    return folder, tensors


def write_reference_model(folder: Path, quant_dir: Path, tensors: dict[str, np.ndarray], v: Variant) -> Path:
    """The checkpoint dequantized by ``reference_dequantize``, saved as a float32 model transformers loads."""
    from safetensors.numpy import save_file

    out = {}
    for key, value in tensors.items():
        if key.endswith(".weight_packed"):
            prefix = key[: -len(".weight_packed")]
            out_f, in_f = (int(x) for x in tensors[f"{prefix}.weight_shape"])
            out[f"{prefix}.weight"] = reference_dequantize(tensors, prefix, v, in_f, out_f)
        elif key.endswith((".weight_scale", ".weight_shape")):
            continue
        elif key.endswith(".qweight"):
            prefix = key[: -len(".qweight")]
            out_f = tensors[f"{prefix}.scales"].shape[1]
            in_f = value.shape[0] * (32 // v.bits) if v.packing == "gptq" else value.shape[0]
            out[f"{prefix}.weight"] = reference_dequantize(tensors, prefix, v, in_f, out_f)
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            out[key] = value.astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((quant_dir / "config.json").read_text())
    raw.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    return folder
