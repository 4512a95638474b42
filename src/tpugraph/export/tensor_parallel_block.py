"""A decoder layer -> the block written in the form tpu-mlir's device-parallel matcher takes (--num-device N > 1).

tpu-mlir splits a block over N devices itself (``model_deploy --num_device N``), but only a block whose attention it
recognises (``FAttentionSliceMerge``: lib/Dialect/Tpu/Transforms/DevParallel/, docs/explanation/tensor-parallel.md):

- the rotary written out as ``x * cos + cat(-x2, x1) * sin`` on the ``[1, S, H, D]`` view of the projection (before
  any transpose), in that operand order, with cos/sin gathered once by position_ids and unsqueezed on axis 2;
  tpugraph's transform then leaves it unfused (its Rope fusion wants the Hugging Face form, after the transpose);
- the key and value the attention reads: the rotated key / the value view themselves (prefill) or their concatenation
  after the history input (decode), which are also the block's KV outputs;
- the attention mask straight from the graph input (no Clip: tpu-mlir's fused attention takes the mask as given);
- the residual added as ``x + attention`` (its first operand the block's input).

It is the same function as the family's own layer for every mask value from the contract's MASK_VALUE up (the Clip
only matters below it), so `verify` and the shard proof apply unchanged. Llama-like layers only (q/k/v/o
projections, no q/k norm, two norms, a gated MLP); others are refused before anything is exported.
"""

from __future__ import annotations

import torch
from torch import nn

from .rotary import RotaryTable

# The attributes a layer needs for this form (family_layers' Llama, Mistral, Qwen2 layers have them).
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be written in the matcher's form (None when it can)."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(hasattr(attn, p) for p in _ATTENTION_PARTS):
        return "its attention is not q/k/v/o projections"
    if any(getattr(attn, n, None) is not None for n in ("q_norm", "k_norm")):
        return "its attention normalises q and k (the matcher wants the rotary straight on the projection)"
    if not all(hasattr(layer, n) for n in _NORMS) or any(hasattr(layer, n) for n in (
            "pre_feedforward_layernorm", "post_feedforward_layernorm")):
        return "its layer has other norms than input_layernorm and post_attention_layernorm"
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        return "its MLP is not a gated gate/up/down MLP"
    return None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _TensorParallelLayer(nn.Module):
    def __init__(self, layer: nn.Module, rotary: RotaryTable):
        super().__init__()
        reason = unsupported_reason(layer)
        if reason:
            raise ValueError(f"the tensor-parallel block form does not fit this layer: {reason}")
        self.layer = layer
        self.rotary = rotary
        attn = layer.self_attn
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.groups = int(attn.num_key_value_groups)

    def _attend(self, x, position_ids, mask, history_k=None, history_v=None):
        layer, attn = self.layer, self.layer.self_attn
        s, d = x.shape[1], self.head_dim
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(1, s, -1, d)
        k = attn.k_proj(h).view(1, s, -1, d)
        v = attn.v_proj(h).view(1, s, -1, d)
        cos, sin = self.rotary(position_ids)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [1, S, 1, D]: one Gather + Unsqueeze each, Q and K share
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys = k if history_k is None else torch.cat([history_k, k], dim=1)
        values = v if history_v is None else torch.cat([history_v, v], dim=1)
        qt, kt, vt = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)  # [1, H, S, D]
        if self.groups > 1:  # repeat_kv, as transformers writes it
            b, kvh, sk, _ = kt.shape
            kt = kt[:, :, None].expand(b, kvh, self.groups, sk, d).reshape(b, kvh * self.groups, sk, d)
            vt = vt[:, :, None].expand(b, kvh, self.groups, sk, d).reshape(b, kvh * self.groups, sk, d)
        scores = torch.matmul(qt, kt.transpose(2, 3)) * self.scaling + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qt.dtype)
        out = torch.matmul(probs, vt).transpose(1, 2).reshape(1, s, -1)
        x = x + attn.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x, k, v


class TensorParallelBlockSegment(_TensorParallelLayer):
    """Prefill: (input_states, position_ids, attention_mask) -> (hidden_states, past_k, past_v), as BlockSegment."""

    def forward(self, input_states, position_ids, attention_mask):
        return self._attend(input_states, position_ids, attention_mask)


class TensorParallelBlockCacheSegment(_TensorParallelLayer):
    """Decode: (input_states, position_ids, attention_mask, history_k, history_v) -> (hidden_states, past_k, past_v),
    as BlockCacheSegment (the history sequence-major, [1, SEQ, KVH, D])."""

    def forward(self, input_states, position_ids, attention_mask, history_k, history_v):
        return self._attend(input_states, position_ids, attention_mask, history_k, history_v)
