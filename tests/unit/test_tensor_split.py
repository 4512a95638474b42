"""The head/column split of a block over N devices (compiler/tensor_parallel.py) and the layer shapes it covers."""

from __future__ import annotations

import pytest
from torch import nn

from tpugraph.compiler.tensor_parallel import tensor_split, valid_device_counts
from tpugraph.errors import UnsupportedModelError, UsageError
from tpugraph.proof.tensor_parallel import check_layer_shape


@pytest.mark.parametrize("heads,kv,n", [(32, 8, 2), (32, 8, 8), (14, 2, 2), (28, 4, 4), (32, 8, 4), (16, 1, 8)])
def test_every_head_and_column_once(heads, kv, n):
    split = tensor_split(heads, kv, n, intermediate=4864)
    q = [h for s in split.shards for h in s.q_heads]
    assert q == list(range(heads))
    cols = [c for s in split.shards for c in s.columns]
    assert cols == list(range(4864))
    group = heads // kv
    for s in split.shards:  # every query head of a device reads a KV head the device holds
        assert {h // group for h in s.q_heads} <= set(s.kv_heads)
    owned = [h for d in split.kv_owners for h in split.shards[d].kv_heads]
    assert owned == list(range(kv))  # the owners' KV caches side by side are the whole cache


def test_uneven_columns_go_to_the_first_devices():
    split = tensor_split(4, 2, 4, intermediate=10)
    assert [len(s.columns) for s in split.shards] == [3, 3, 2, 2]


@pytest.mark.parametrize("heads,kv,n,needle", [
    (14, 2, 4, "14 attention heads do not split evenly over 4 devices; --num-device 2 would"),
    (24, 6, 4, "6 KV heads neither split evenly over 4 devices nor divide 4"),
    (12, 3, 2, "3 KV heads"),
])
def test_no_split_is_one_line(heads, kv, n, needle):
    with pytest.raises(UsageError) as err:
        tensor_split(heads, kv, n)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert err.value.option == "num_device"


def test_valid_device_counts():
    assert valid_device_counts(32, 8) == [2, 4, 8]
    assert valid_device_counts(15, 5) == []


def _layer(extra: bool = False, fused_qkv: bool = False) -> nn.Module:
    layer = nn.Module()
    attn = nn.Module()
    for p in (["qkv_proj", "o_proj"] if fused_qkv else ["q_proj", "k_proj", "v_proj", "o_proj"]):
        setattr(attn, p, nn.Linear(4, 4))
    mlp = nn.Module()
    for p in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, p, nn.Linear(4, 4))
    layer.self_attn, layer.mlp = attn, mlp
    layer.input_layernorm, layer.post_attention_layernorm = nn.LayerNorm(4), nn.LayerNorm(4)
    if extra:
        layer.post_feedforward_layernorm = nn.LayerNorm(4)
    return layer


def test_layer_shapes_covered():
    check_layer_shape(_layer(), "llama")
    with pytest.raises(UnsupportedModelError, match="gemma3's decoder layer has extra post_feedforward_layernorm"):
        check_layer_shape(_layer(extra=True), "gemma3")
    with pytest.raises(UnsupportedModelError, match="no self_attn.q_proj"):
        check_layer_shape(_layer(fused_qkv=True), "phi3")
