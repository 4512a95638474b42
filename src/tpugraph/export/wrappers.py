"""Hugging Face modules -> torch modules whose signatures are exactly the segments of the contract."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def _layer_cache_kwarg(layer: nn.Module) -> str:
    """The keyword a decoder layer takes its KV cache under: 'cache' (5.x) or 'past_key_value(s)' (4.x)."""
    params = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    raise TypeError(f"{type(layer).__name__}.forward takes no KV cache argument")


class _CaptureKV:
    """A stand-in KV cache: records the new keys/values and attends over history + new.

    Transformers' attention calls ``cache.update(k, v, layer_idx, ...)`` and attends over what it
    returns, so this is the one seam through which the block sees its history, on 4.x and 5.x alike.
    """

    def __init__(self, history_k: torch.Tensor | None = None, history_v: torch.Tensor | None = None):
        self.history_k = history_k
        self.history_v = history_v
        self.new_k: torch.Tensor | None = None
        self.new_v: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        self.new_k, self.new_v = key_states, value_states
        if self.history_k is None:
            return key_states, value_states
        return torch.cat([self.history_k, key_states], dim=2), torch.cat([self.history_v, value_states], dim=2)

    # Some 4.x code paths ask the cache these; a fixed-size contract cache has nothing to report.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.history_k is None else int(self.history_k.shape[2])


class RotaryTable(nn.Module):
    """cos/sin for positions 0..SEQ-1 baked in as constants; looked up by position_ids (a Gather)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.register_buffer("cos", cos.float().contiguous(), persistent=False)
        self.register_buffer("sin", sin.float().contiguous(), persistent=False)

    @classmethod
    def from_hf(cls, rotary: nn.Module, seq: int, **call_kwargs) -> "RotaryTable":
        pos = torch.arange(seq, dtype=torch.long)[None]
        probe = torch.zeros(1, seq, 1, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = rotary(probe, pos, **call_kwargs)
        return cls(cos[0], sin[0])

    def forward(self, position_ids: torch.Tensor):
        return self.cos[position_ids], self.sin[position_ids]


class EmbeddingSegment(nn.Module):
    def __init__(self, embed: nn.Module, scale: float | None = None):
        super().__init__()
        self.embed = embed
        self.scale = scale

    def forward(self, input_ids):
        x = self.embed(input_ids)
        if self.scale is not None:
            x = x * torch.tensor(self.scale, dtype=x.dtype)
        return x


def _call_layer(layer: nn.Module, cache_kwarg: str, x, mask, position_ids, rotary, cache: _CaptureKV):
    out = layer(
        x,
        attention_mask=mask,
        position_ids=position_ids,
        position_embeddings=rotary,
        use_cache=True,
        **{cache_kwarg: cache},
    )
    return out[0] if isinstance(out, tuple) else out


class BlockSegment(nn.Module):
    """Prefill: (input_states, position_ids, attention_mask) -> (hidden_states, past_k, past_v)."""

    def __init__(self, layer: nn.Module, rotary: RotaryTable):
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.cache_kwarg = _layer_cache_kwarg(layer)

    def forward(self, input_states, position_ids, attention_mask):
        cache = _CaptureKV()
        hidden = _call_layer(self.layer, self.cache_kwarg, input_states, attention_mask, position_ids,
                             self.rotary(position_ids), cache)
        # Hugging Face keeps KV head-major [1, KVH, S, D]; the TPU runtime wants sequence-major.
        return hidden, cache.new_k.transpose(1, 2), cache.new_v.transpose(1, 2)


class BlockCacheSegment(nn.Module):
    """Decode: (input_states, position_ids, attention_mask, history_k, history_v) -> (hidden_states, past_k, past_v)."""

    def __init__(self, layer: nn.Module, rotary: RotaryTable):
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.cache_kwarg = _layer_cache_kwarg(layer)

    def forward(self, input_states, position_ids, attention_mask, history_k, history_v):
        cache = _CaptureKV(history_k.transpose(1, 2), history_v.transpose(1, 2))
        hidden = _call_layer(self.layer, self.cache_kwarg, input_states, attention_mask, position_ids,
                             self.rotary(position_ids), cache)
        return hidden, cache.new_k.transpose(1, 2), cache.new_v.transpose(1, 2)


class LmHeadSegment(nn.Module):
    """Final norm, output projection and optional logit soft-capping: [1, H] -> [1, V]."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, softcap: float | None = None):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.softcap = softcap

    def forward(self, hidden_states):
        logits = self.lm_head(self.norm(hidden_states))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class GreedyHeadSegment(nn.Module):
    """[1, V] logits -> [1, 1] argmax token."""

    def __init__(self, int_dtype: torch.dtype = torch.int32):
        super().__init__()
        self.int_dtype = int_dtype

    def forward(self, m_logits):
        return torch.argmax(m_logits, dim=-1, keepdim=True).to(self.int_dtype)
