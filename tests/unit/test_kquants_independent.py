"""Q4_K, Q5_K and Q6_K as tpugraph reads them from a .gguf, bit for bit against an independent numpy reading
of ggml's block layouts (gguf_files.reference_dequantize_k, written from ggml's dequantize_row_q*_K C code).
transformers' GGUF loader decodes with the same gguf package tpugraph uses, so test_gguf's comparison with it
is no independent check of these three types; this one is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf_files import (
    GGUF_TINY,
    LINEAR_NAMES,
    k_quant_blocks,
    reference_dequantize_k,
    reference_dequantize_k_block,
    write_gguf,
)

from tpugraph.source.checkpoint import load_config, open_weights, resolve_model
from tpugraph.source.gguf import GgufWeights

K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
MATRICES = ["token_embd.weight", "output.weight"] + [f"blk.{i}.{n}.weight" for i in range(2) for n in LINEAR_NAMES]


def _k_assignment(shift: int = 0) -> dict[str, str]:
    return {name: K_TYPES[(i + shift) % 3] for i, name in enumerate(MATRICES)}


def _unpermute(stored: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of gguf_files.llama_permute (llama.cpp's q/k row interleaving), rows moved, values untouched."""
    rows = stored.shape[0]
    return stored.reshape(n_head, rows // n_head // 2, 2, *stored.shape[1:]).swapaxes(1, 2).reshape(stored.shape)


def _raw_tensors(path: Path) -> dict[str, tuple[str, tuple[int, int], int, int]]:
    """GGUF name -> (ggml type, (rows, cols), byte offset in the file, byte count), from the file's header."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            out[t.name] = (t.tensor_type.name, (int(t.shape[1]), int(t.shape[0])), int(t.data_offset),
                           int(t.n_bytes))
    return out


def _weights(path: Path) -> GgufWeights:
    source = resolve_model(str(path))
    config, _ = load_config(source)
    weights = open_weights(source, config)
    assert isinstance(weights, GgufWeights)
    return weights


def _reference(data: bytes, qtype: str, shape: tuple[int, int], gguf_name: str) -> np.ndarray:
    want = reference_dequantize_k(np.frombuffer(data, np.uint8), qtype, shape)
    if ".attn_q." in gguf_name:
        want = _unpermute(want, GGUF_TINY["heads"])
    elif ".attn_k." in gguf_name:
        want = _unpermute(want, GGUF_TINY["kv_heads"])
    return want


@pytest.mark.parametrize("random_k_scales", [False, True], ids=["fixed-d", "random-d"])
def test_k_quants_read_bit_for_bit_like_ggml_block_layout(tmp_path, random_k_scales):
    path = tmp_path / "k.gguf"
    write_gguf(path, _k_assignment(), seed=3, random_k_scales=random_k_scales)
    weights = _weights(path)
    data = path.read_bytes()
    raw = _raw_tensors(path)
    checked: dict[str, int] = {}
    for key in weights.keys():
        name = weights.gguf_name(key)
        if name not in raw:
            continue  # norms (F32 vectors)
        qtype, shape, offset, n_bytes = raw[name]
        assert qtype == weights.ggml_type(key) and qtype in K_TYPES, (name, qtype)
        want = _reference(data[offset:offset + n_bytes], qtype, shape, name)
        mine = weights.get(key).numpy()
        assert mine.dtype == np.float32 and mine.shape == want.shape, (key, mine.shape, want.shape)
        assert np.isfinite(want).all(), key
        assert np.array_equal(mine, want), (key, qtype, int((mine != want).sum()))
        checked[qtype] = checked.get(qtype, 0) + 1
    assert sorted(checked) == list(K_TYPES) and sum(checked.values()) == len(MATRICES), checked


@pytest.mark.parametrize("qtype", K_TYPES)
def test_array_reference_equals_a_value_by_value_transcription(qtype):
    rng = np.random.default_rng(11)
    blocks = k_quant_blocks(2, 4 * 256, qtype, rng, random_scales=True)  # 8 super-blocks
    fast = reference_dequantize_k(blocks, qtype, (2, 1024)).reshape(-1, 256)
    size = blocks.shape[1] // 4
    slow = np.stack([reference_dequantize_k_block(b, qtype) for b in blocks.reshape(-1, size)])
    assert np.array_equal(fast, slow)
    # Not a degenerate comparison: finite, and hundreds of distinct values over the 8 super-blocks.
    assert np.isfinite(fast).all() and len(np.unique(fast)) > 500


# (qtype, two byte offsets inside the block's scales whose swap must change the reading)
SCALE_SWAPS = {"Q4_K": (4, 12), "Q5_K": (5, 14), "Q6_K": (192, 207)}


@pytest.mark.parametrize("qtype", K_TYPES)
def test_a_corrupted_layout_is_detected(tmp_path, qtype):
    """Two scale bytes swapped in one tensor of the file: the reference of the original bytes no longer
    equals what tpugraph reads, the reference of the corrupted bytes does (so the comparison above can fail)."""
    path = tmp_path / "k.gguf"
    write_gguf(path, _k_assignment(), seed=5, random_k_scales=True)
    raw = _raw_tensors(path)
    name = next(n for n, r in raw.items() if r[0] == qtype and ".attn_" not in n)
    _, shape, offset, n_bytes = raw[name]
    data = bytearray(path.read_bytes())
    original = bytes(data[offset:offset + n_bytes])
    a, b = SCALE_SWAPS[qtype]
    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype]
    block0 = np.frombuffer(original[:size], np.uint8)
    swapped = block0.copy()
    swapped[[a, b]] = swapped[[b, a]]
    if block0[a] == block0[b]:  # make them differ, then swap
        swapped[a] ^= 0x5A
        swapped[[a, b]] = swapped[[b, a]]
    # The reference itself sees the swap.
    assert not np.array_equal(reference_dequantize_k(block0, qtype, (1, 256)),
                              reference_dequantize_k(swapped, qtype, (1, 256)))
    data[offset:offset + size] = swapped.tobytes()
    path.write_bytes(bytes(data))
    weights = _weights(path)
    key = next(k for k in weights.keys() if weights.gguf_name(k) == name)
    mine = weights.get(key).numpy()
    assert not np.array_equal(mine, _reference(original, qtype, shape, name))
    assert np.array_equal(mine, _reference(bytes(data[offset:offset + n_bytes]), qtype, shape, name))
    # Only the first super-block's 256 values changed.
    diff = np.argwhere(mine != _reference(original, qtype, shape, name))
    assert diff.size and (diff[:, 0] == 0).all() and (diff[:, 1] < 256).all(), diff[:5]
