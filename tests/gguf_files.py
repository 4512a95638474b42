"""Tiny Llama GGUF files written in code with the gguf package, and an independent numpy reading of the
simple block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and the K-quants (Q4_K, Q5_K, Q6_K) from the ggml block
layouts (ggml's dequantize_row_* reference C, not the gguf package's Python)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

GGUF_TINY = dict(vocab=256, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)
ALL_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
LINEAR_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# K-quant block layouts: (bytes per 256 values, [(byte offset, scale value)] of the float16 scale fields)
K_BLOCKS = {"Q4_K": (144, [(0, 2e-4), (2, 3e-4)]), "Q5_K": (176, [(0, 1e-4), (2, 2e-4)]),
            "Q6_K": (210, [(208, 3e-5)]), "Q2_K": (84, [(80, 1e-3), (82, 1e-3)])}


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(rows: int, cols: int, qtype: str, rng, random_scales: bool = False) -> np.ndarray:
    """Random K-quant blocks with small, finite scales (the gguf package has no K-quant quantizer).
    ``random_scales``: each block's float16 d/dmin drawn at random (either sign, 1e-5..1e-2) instead of
    the fixed values of K_BLOCKS."""
    size, scales = K_BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for offset, value in scales:
        if random_scales:
            values = rng.uniform(1e-5, 1e-2, (rows, cols // 256)) * rng.choice([-1.0, 1.0], (rows, cols // 256))
            blocks[:, :, offset:offset + 2] = values.astype(np.float16)[..., None].view(np.uint8)
        else:
            blocks[:, :, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return blocks.reshape(rows, cols // 256 * size)


def encode(array: np.ndarray, qtype: str, rng, random_k_scales: bool = False):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return array.astype(np.float32), None
    if qtype == "F16":
        return array.astype(np.float16), None
    if qtype in K_BLOCKS:
        return k_quant_blocks(array.shape[0], array.shape[1], qtype, rng, random_k_scales), t
    return gguf.quants.quantize(array.astype(np.float32), t), t


def write_gguf(path: Path, types: dict[str, str] | None = None, default: str = "F32", seed: int = 0,
               tied: bool = False, random_k_scales: bool = False) -> dict[str, np.ndarray]:
    """A 2-layer Llama .gguf; ``types`` maps GGUF tensor names to ggml types (others ``default``, norms F32).
    ``random_k_scales``: K-quant blocks get random float16 d/dmin (see k_quant_blocks).
    Returns the float tensors (HF layout, q/k before llama.cpp's permutation) by GGUF name."""
    import gguf

    c = GGUF_TINY
    rng = np.random.default_rng(seed)
    head_dim = c["hidden"] // c["heads"]
    floats: dict[str, np.ndarray] = {"token_embd.weight": rng.normal(0, 0.5, (c["vocab"], c["hidden"]))}
    if not tied:
        floats["output.weight"] = rng.normal(0, 0.1, (c["vocab"], c["hidden"]))
    floats["output_norm.weight"] = 1 + rng.normal(0, 0.1, c["hidden"])
    for i in range(c["layers"]):
        shapes = {"attn_q": (c["hidden"], c["hidden"]), "attn_k": (c["kv_heads"] * head_dim, c["hidden"]),
                  "attn_v": (c["kv_heads"] * head_dim, c["hidden"]), "attn_output": (c["hidden"], c["hidden"]),
                  "ffn_gate": (c["intermediate"], c["hidden"]), "ffn_up": (c["intermediate"], c["hidden"]),
                  "ffn_down": (c["hidden"], c["intermediate"])}
        for name, shape in shapes.items():
            floats[f"blk.{i}.{name}.weight"] = rng.normal(0, 0.05, shape)
        floats[f"blk.{i}.attn_norm.weight"] = 1 + rng.normal(0, 0.1, c["hidden"])
        floats[f"blk.{i}.ffn_norm.weight"] = 1 + rng.normal(0, 0.1, c["hidden"])
    floats = {k: v.astype(np.float32) for k, v in floats.items()}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(c["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["intermediate"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(c["vocab"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, value in floats.items():
        stored = value
        if ".attn_q." in name:
            stored = llama_permute(value, c["heads"])
        elif ".attn_k." in name:
            stored = llama_permute(value, c["kv_heads"])
        qtype = "F32" if value.ndim == 1 else (types or {}).get(name, default)
        data, raw = encode(stored, qtype, rng, random_k_scales)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return floats


def all_types_assignment() -> dict[str, str]:
    """Every supported type on at least one matrix of the tiny model (16 matrices, 11 types)."""
    names = ["token_embd.weight", "output.weight"] + [f"blk.{i}.{n}.weight" for i in range(2) for n in LINEAR_NAMES]
    return {name: ALL_TYPES[i % len(ALL_TYPES)] for i, name in enumerate(names)}


def reference_dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    """ggml's block formulas, element by element, for the simple block types -> float32 [rows, cols]."""
    rows = raw.reshape(shape[0], -1)
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}[qtype]
    out = np.zeros(shape, np.float32)
    for r in range(shape[0]):
        for b in range(shape[1] // 32):
            block = rows[r, b * size:(b + 1) * size]
            d = np.float32(block[0:2].view(np.float16)[0])
            vals = np.zeros(32, np.float32)
            if qtype == "Q8_0":
                vals = d * block[2:34].view(np.int8).astype(np.float32)
            elif qtype in ("Q4_0", "Q4_1"):
                m = np.float32(block[2:4].view(np.float16)[0]) if qtype == "Q4_1" else None
                qs = block[4:20] if qtype == "Q4_1" else block[2:18]
                for j in range(16):
                    lo, hi = int(qs[j] & 0x0F), int(qs[j] >> 4)
                    if m is None:
                        vals[j], vals[j + 16] = d * np.float32(lo - 8), d * np.float32(hi - 8)
                    else:
                        vals[j], vals[j + 16] = d * np.float32(lo) + m, d * np.float32(hi) + m
            else:
                m = np.float32(block[2:4].view(np.float16)[0]) if qtype == "Q5_1" else None
                start = 4 if qtype == "Q5_1" else 2
                qh = int(block[start:start + 4].view(np.uint32)[0])
                qs = block[start + 4:start + 20]
                for j in range(16):
                    lo = int(qs[j] & 0x0F) | (((qh >> j) & 1) << 4)
                    hi = int(qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)
                    if m is None:
                        vals[j], vals[j + 16] = d * np.float32(lo - 16), d * np.float32(hi - 16)
                    else:
                        vals[j], vals[j + 16] = d * np.float32(lo) + m, d * np.float32(hi) + m
            out[r, b * 32:(b + 1) * 32] = vals
    return out


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 bytes [..., 2] -> float32 [...]."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def _k4_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for the 8 sub-blocks of 32: 12 packed bytes [n, 12] -> 6-bit (scale, min) [n, 8].
    Sub-blocks 0-3: low 6 bits of bytes 0-3 (scale) and 4-7 (min). Sub-blocks 4-7: the low (scale) / high
    (min) nibble of bytes 8-11, topped with the 2 high bits of bytes 0-3 (scale) / 4-7 (min)."""
    q = scales.astype(np.int32)
    sc = np.empty((q.shape[0], 8), np.int32)
    mn = np.empty((q.shape[0], 8), np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j] = q[:, j] & 63
            mn[:, j] = q[:, j + 4] & 63
        else:
            sc[:, j] = (q[:, j + 4] & 0x0F) | ((q[:, j - 4] >> 6) << 4)
            mn[:, j] = (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
    return sc, mn


def reference_dequantize_k(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    """ggml's dequantize_row_q4_K / q5_K / q6_K, loop by loop over the 256-value super-blocks, in float32
    with ggml's order of operations: (d*scale)*q - (dmin*min) for Q4_K/Q5_K, (d*scale)*q for Q6_K
    -> float32 [rows, cols]."""
    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype]
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, size)
    n = b.shape[0]
    y = np.empty((n, 256), np.float32)
    if qtype in ("Q4_K", "Q5_K"):
        # block_q4_K: f16 d, f16 dmin, scales[12], qs[128]; block_q5_K: the same with qh[32] before qs.
        d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
        sc, mn = _k4_scale_min(b[:, 4:16])
        qh = b[:, 16:48].astype(np.int32) if qtype == "Q5_K" else None
        qs = (b[:, 48:176] if qtype == "Q5_K" else b[:, 16:144]).astype(np.int32)
        for chunk in range(4):  # 64 values each: sub-block 2c from the low nibbles, 2c+1 from the high
            ql = qs[:, 32 * chunk:32 * chunk + 32]
            for half, nib in ((0, ql & 0x0F), (1, ql >> 4)):
                sub = 2 * chunk + half
                if qh is not None:  # bit (2c + half) of qh[l] is the 5th bit of value l of this sub-block
                    nib = nib + np.where(qh & (1 << sub), 16, 0)
                scale = d * sc[:, sub:sub + 1].astype(np.float32)
                minimum = dmin * mn[:, sub:sub + 1].astype(np.float32)
                y[:, 32 * sub:32 * sub + 32] = scale * nib.astype(np.float32) - minimum
    elif qtype == "Q6_K":
        # block_q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (one per 16 values), f16 d.
        ql_all, qh_all = b[:, 0:128].astype(np.int32), b[:, 128:192].astype(np.int32)
        scales = b[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(b[:, 208:210])[:, None]
        for part in range(2):  # 128 values each, from ql[64 part:], qh[32 part:], scales[8 part:]
            ql = ql_all[:, 64 * part:64 * part + 64]
            qh = qh_all[:, 32 * part:32 * part + 32]
            quads = ((ql[:, :32] & 0x0F, 0), (ql[:, 32:] & 0x0F, 2), (ql[:, :32] >> 4, 4), (ql[:, 32:] >> 4, 6))
            for k, (low, shift) in enumerate(quads):  # values 32k..32k+31 of this part
                q = (low | (((qh >> shift) & 3) << 4)) - 32
                for half in range(2):  # 16 values per int8 scale
                    scale = d * scales[:, 8 * part + 2 * k + half:8 * part + 2 * k + half + 1]
                    cols = slice(128 * part + 32 * k + 16 * half, 128 * part + 32 * k + 16 * half + 16)
                    y[:, cols] = scale * q[:, 16 * half:16 * half + 16].astype(np.float32)
    else:
        raise ValueError(qtype)
    return y.reshape(shape)


def reference_dequantize_k_block(block: np.ndarray, qtype: str) -> np.ndarray:
    """One super-block, value by value, as ggml's C loops run (a second, scalar reading to check the array
    one above against): float32 [256]."""
    blk = [int(v) for v in block]
    half = lambda i: np.float32(np.frombuffer(bytes(blk[i:i + 2]), "<f2")[0])  # noqa: E731
    out = np.zeros(256, np.float32)
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin, s = half(0), half(2), blk[4:16]
        qh = blk[16:48] if qtype == "Q5_K" else [0] * 32
        qs = blk[48:176] if qtype == "Q5_K" else blk[16:144]

        def scale_min(j):
            if j < 4:
                return s[j] & 63, s[j + 4] & 63
            return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)

        i = 0
        for chunk in range(4):
            for sub, shift in ((2 * chunk, 0), (2 * chunk + 1, 4)):
                sc, m = scale_min(sub)
                d1, m1 = d * np.float32(sc), dmin * np.float32(m)
                for l in range(32):
                    q = ((qs[32 * chunk + l] >> shift) & 0xF) + (16 if qh[l] & (1 << sub) else 0)
                    out[i] = d1 * np.float32(q) - m1
                    i += 1
    else:
        ql, qh, d = blk[0:128], blk[128:192], half(208)
        sc = [v - 256 if v > 127 else v for v in blk[192:208]]
        for part in range(2):
            for l in range(32):
                is_ = l // 16
                a, c, h = ql[64 * part + l], ql[64 * part + l + 32], qh[32 * part + l]
                q1 = ((a & 0xF) | (((h >> 0) & 3) << 4)) - 32
                q2 = ((c & 0xF) | (((h >> 2) & 3) << 4)) - 32
                q3 = ((a >> 4) | (((h >> 4) & 3) << 4)) - 32
                q4 = ((c >> 4) | (((h >> 6) & 3) << 4)) - 32
                for k, q in enumerate((q1, q2, q3, q4)):
                    out[128 * part + 32 * k + l] = d * np.float32(sc[8 * part + is_ + 2 * k]) * np.float32(q)
    return out
