"""Tiny Llama GGUF files written in code with the gguf package, and an independent numpy reading of the
simple block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) from the ggml block layouts."""

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


def k_quant_blocks(rows: int, cols: int, qtype: str, rng) -> np.ndarray:
    """Random K-quant blocks with small, finite scales (the gguf package has no K-quant quantizer)."""
    size, scales = K_BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for offset, value in scales:
        blocks[:, :, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return blocks.reshape(rows, cols // 256 * size)


def encode(array: np.ndarray, qtype: str, rng):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return array.astype(np.float32), None
    if qtype == "F16":
        return array.astype(np.float16), None
    if qtype in K_BLOCKS:
        return k_quant_blocks(array.shape[0], array.shape[1], qtype, rng), t
    return gguf.quants.quantize(array.astype(np.float32), t), t


def write_gguf(path: Path, types: dict[str, str] | None = None, default: str = "F32", seed: int = 0,
               tied: bool = False) -> dict[str, np.ndarray]:
    """A 2-layer Llama .gguf; ``types`` maps GGUF tensor names to ggml types (others ``default``, norms F32).
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
        data, raw = encode(stored, qtype, rng)
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
