"""Gated DeltaNet linear attention (Qwen3.5, Qwen3-Next) -> static-shape segments whose states are explicit
inputs/outputs.

A linear-attention layer carries two states instead of a KV cache: the depthwise causal conv's last K inputs
(``conv_state`` [1, conv_dim, K]) and the delta rule's recurrent state (``recurrent_state`` [1, Hv, Dk, Dv]).
ONNX has no in-place update, so a segment takes them as inputs and returns the new ones as outputs.

- Prefill ``block_i``: (input_states [1,SEQ,H], attention_mask [1,1,SEQ,SEQ]) -> (hidden_states,
  next_conv_state, next_recurrent_state). The state starts at zero. Only the mask's diagonal is read:
  row r attends to itself iff r is a prompt token, so pad rows (r >= n) get gate g = 0 and beta = 0 and
  leave the recurrent state untouched, and the conv state is the last K prompt columns (zero-padded on the
  left when n < K), picked by a one-hot MatMul.
- Decode ``block_cache_i``: (input_states [1,1,H], conv_state, recurrent_state) -> (hidden_states,
  next_conv_state, next_recurrent_state): one step of the causal conv and of the gated delta rule.

transformers' chunked rule solves a unit lower-triangular system per chunk (``solve_triangular``, which the
TorchScript exporter cannot export). Inside a chunk of C positions the strictly lower part A is nilpotent
(A^C = 0), so (I + A)^-1 = sum_j (-A)^j = (I - A)(I + A^2)(I + A^4)...(I + A^(C/2)): log2(C) MatMul pairs.
The chunk loop is unrolled over SEQ / C chunks.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

CHUNK = 64  # transformers' chunk size; a shorter SEQ is one chunk of SEQ positions


def unit_lower_inverse(strict_lower: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 for A strictly lower triangular [..., C, C], as a finite product of MatMuls."""
    c = int(strict_lower.shape[-1])
    eye = torch.eye(c, dtype=strict_lower.dtype)
    result = eye - strict_lower  # sum over j < 2
    power, covered = strict_lower @ strict_lower, 2
    while covered < c:
        result = result @ (eye + power)  # now sums j < 2 * covered
        covered *= 2
        if covered < c:
            power = power @ power
    return result


def _expand_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """repeat_interleave(n_rep, dim=2) of [B, S, H, D] as expand + reshape (static)."""
    if n_rep == 1:
        return x
    b, s, h, d = (int(n) for n in x.shape)
    # Concat, not expand: the exporter writes expand's shape as a computed Where, which ONNX shape inference
    # cannot follow (the segment's outputs would lose their static shapes).
    return torch.cat([x.unsqueeze(3)] * n_rep, dim=3).reshape(b, s, h * n_rep, d)


def _append_zeros(x: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    shape = [int(n) for n in x.shape]
    shape[dim] = count
    return torch.cat([x, torch.zeros(shape, dtype=x.dtype)], dim=dim)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_gated_delta_rule_static(query, key, value, g, beta, chunk: int = CHUNK):
    """transformers' ``torch_chunk_gated_delta_rule`` from a zero state, with static ops only.

    query/key [1, S, Hk, Dk], value [1, S, Hv, Dv], g/beta [1, S, Hv] -> (out [1, S, Hv, Dv], state
    [1, Hv, Dk, Dv]). Positions with g = 0 and beta = 0 change nothing in the state.
    """
    dtype = query.dtype
    seq = int(query.shape[1])
    n_rep = int(value.shape[2]) // int(key.shape[2])
    query, key = _expand_heads(query, n_rep), _expand_heads(key, n_rep)
    heads, dk, dv = int(value.shape[2]), int(key.shape[-1]), int(value.shape[-1])
    # Batch 1 dropped: [H, S, D]. Every tensor stays within 4-D ([H, N, C, D]); tpu-mlir 1.30 computes 5-D
    # batched MatMuls wrongly (its own transform compare fails on them).
    query, key, value = (x.reshape(seq, heads, -1).transpose(0, 1).float() for x in (query, key, value))
    beta, g = (x.reshape(seq, heads).transpose(0, 1).float() for x in (beta, g))  # [H, S]
    query, key = _l2norm(query), _l2norm(key)
    query = query * (dk ** -0.5)
    chunk = min(chunk, seq)
    pad = (chunk - seq % chunk) % chunk
    if pad:  # zeros appended along the sequence (a Concat of constants: static, unlike the exporter's Pad)
        query, key, value = (_append_zeros(x, pad, 1) for x in (query, key, value))
        beta, g = (_append_zeros(x, pad, 1) for x in (beta, g))
    n_chunks = (seq + pad) // chunk
    v_beta = value * beta.unsqueeze(-1)
    k_beta = key * beta.unsqueeze(-1)
    query, key, k_beta, v_beta = (x.reshape(heads, n_chunks, chunk, x.shape[-1]) for x in (query, key, k_beta, v_beta))
    g = g.reshape(heads, n_chunks, 1, chunk)
    # Constant masks (Mul, not Trilu/Where/-inf, so that every op is one tpu-mlir converts exactly).
    lower = torch.ones(chunk, chunk).tril()  # j <= i
    strict = torch.ones(chunk, chunk).tril(-1)  # j < i
    cum = g @ lower.t()  # [H, N, 1, C], the cumulative sum inside the chunk as a MatMul: sum_{j <= i} g[j]
    cum_col = cum.transpose(-1, -2)  # [H, N, C, 1]
    pairwise = torch.exp((cum_col - cum) * lower) * lower  # exp(cum_i - cum_j) for j <= i, else 0
    ut = (k_beta @ key.transpose(-1, -2)) * pairwise
    attn = (query @ key.transpose(-1, -2)) * pairwise
    inverse = unit_lower_inverse(ut * strict)
    new_values = inverse @ v_beta
    k_cumdecay = inverse @ (k_beta * torch.exp(cum_col))
    query = query * torch.exp(cum_col)
    last = cum_col[:, :, chunk - 1:, :]  # [H, N, 1, 1]
    key = key * torch.exp(last - cum_col)
    chunk_decay = torch.exp(last)
    state = None
    outs = []
    for i in range(n_chunks):
        if state is None:  # zero initial state: the terms that read it vanish
            v_new = new_values[:, i]
            outs.append(attn[:, i] @ v_new)
            state = key[:, i].transpose(-1, -2) @ v_new  # [H, Dk, Dv]
        else:
            v_new = new_values[:, i] - k_cumdecay[:, i] @ state
            outs.append(query[:, i] @ state + attn[:, i] @ v_new)
            state = state * chunk_decay[:, i] + key[:, i].transpose(-1, -2) @ v_new
    out = torch.cat(outs, dim=1) if n_chunks > 1 else outs[0]  # [H, S + pad, Dv]
    if pad:
        out = out[:, :seq]
    out = out.transpose(0, 1).reshape(1, seq, heads, dv)
    return out.to(dtype), state.reshape(1, heads, dk, dv)


def recurrent_gated_delta_step(query, key, value, g, beta, state):
    """One token of transformers' ``torch_recurrent_gated_delta_rule``: q/k [1,1,Hk,Dk], v [1,1,Hv,Dv],
    g/beta [1,1,Hv], state [1,Hv,Dk,Dv] -> (out [1,1,Hv,Dv], new state)."""
    dtype = query.dtype
    n_rep = int(value.shape[2]) // int(key.shape[2])
    query, key = _expand_heads(query, n_rep), _expand_heads(key, n_rep)
    query, key, value, beta, g = [x.transpose(1, 2).float() for x in (query, key, value, beta, g)]  # [1,H,1,.]
    query, key = _l2norm(query), _l2norm(key)
    query = query * (query.shape[-1] ** -0.5)
    state = state.float() * torch.exp(g).unsqueeze(-1)  # g [1,H,1] -> [1,H,1,1]
    kv_mem = key @ state  # [1,H,1,Dv]
    delta = (value - kv_mem) * beta.unsqueeze(-1)
    state = state + key.transpose(-1, -2) @ delta
    out = query @ state  # [1,H,1,Dv]
    return out.transpose(1, 2).to(dtype), state


def last_columns(x: torch.Tensor, n: torch.Tensor, k_size: int) -> torch.Tensor:
    """Columns n-K..n-1 of ``x`` [1, C, S] (zeros where n - K + j < 0): the conv state a prompt of n tokens
    leaves, as a MatMul by a one-hot [S, K] (static: n is a traced value)."""
    seq = int(x.shape[-1])
    # one-hot [S, K]: column j picks position n - K + j (none when negative: zero left padding)
    positions = torch.arange(seq, dtype=x.dtype).unsqueeze(-1)
    wanted = (n - k_size + torch.arange(k_size, dtype=x.dtype)).unsqueeze(0)
    pick = torch.relu(1.0 - torch.abs(positions - wanted))
    return x @ pick


def causal_conv_with_state(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cache: "StateCapture",
                           seq: int) -> torch.Tensor:
    """A depthwise causal conv over ``x`` [1, C, S] (``weight`` [C, K]) that carries its conv state through
    ``cache``: from an empty state for a prefill (a Conv, then the last K prompt columns as the next state), else
    one decode step (the state shifted by the new column, weighted and summed). Gated DeltaNet's and LFM2's."""
    k_size = int(weight.shape[-1])
    if cache.conv_state is None:  # prefill from an empty state
        # ONNX Conv has no bfloat16 kernel type: with --dtype bfloat16 the conv runs in float32.
        wide = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
        conv = F.conv1d(x.to(wide), weight.unsqueeze(1).to(wide), None if bias is None else bias.to(wide),
                        padding=k_size - 1, groups=int(x.shape[1]))
        conv = conv[:, :, :seq].to(x.dtype)
        cache.next_conv_state = last_columns(x, cache.valid.sum(), k_size)
    else:  # one decode step
        full = torch.cat([cache.conv_state.to(x.dtype), x], dim=-1)  # [1, C, K + 1]
        cache.next_conv_state = full[:, :, 1:]
        conv = (cache.next_conv_state * weight).sum(dim=-1, keepdim=True)
        if bias is not None:
            conv = conv + bias.unsqueeze(-1)
    return conv


class StateCapture:
    """Stand-in for transformers' cache in a linear-attention layer: the states in, the new ones out, and
    (prefill) which positions are prompt tokens."""

    def __init__(self, valid: torch.Tensor | None = None, conv_state: torch.Tensor | None = None,
                 recurrent_state: torch.Tensor | None = None):
        self.valid = valid  # [SEQ] 1.0 for prompt tokens, 0.0 for pad rows
        self.conv_state = conv_state
        self.recurrent_state = recurrent_state
        self.next_conv_state: torch.Tensor | None = None
        self.next_recurrent_state: torch.Tensor | None = None


def _separate_projections(self, hidden_states, batch: int, seq: int):
    """Qwen3.5's four input projections -> (q|k|v [1, C, S], z [1, S, Hv, Dv], b [1, S, Hv], a [1, S, Hv])."""
    mixed = self.in_proj_qkv(hidden_states).transpose(1, 2)
    z = self.in_proj_z(hidden_states).reshape(batch, seq, -1, self.head_v_dim)
    return mixed, z, self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)


def _grouped_projections(self, hidden_states, batch: int, seq: int):
    """Qwen3-Next's two fused projections, whose rows are grouped per key head ([q k v z] and [b a] of each
    head's share), as ``fix_query_key_value_ordering`` reads them -> the same four tensors as
    ``_separate_projections``, with static reshapes and slices."""
    hk, dk, dv = int(self.num_k_heads), int(self.head_k_dim), int(self.head_v_dim)
    rep = int(self.num_v_heads) // hk
    qkvz = self.in_proj_qkvz(hidden_states).reshape(batch, seq, hk, 2 * dk + 2 * rep * dv)
    query, key, value, z = torch.split(qkvz, [dk, dk, rep * dv, rep * dv], dim=3)
    ba = self.in_proj_ba(hidden_states).reshape(batch, seq, hk, 2 * rep)
    b, a = torch.split(ba, [rep, rep], dim=3)
    mixed = torch.cat([x.reshape(batch, seq, -1) for x in (query, key, value)], dim=-1).transpose(1, 2)
    heads = hk * rep
    return mixed, z.reshape(batch, seq, heads, dv), b.reshape(batch, seq, heads), a.reshape(batch, seq, heads)


def _gated_deltanet_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Qwen3_5GatedDeltaNet.forward (Qwen3NextGatedDeltaNet.forward) with static shapes; states through
    ``cache`` (a StateCapture)."""
    if not isinstance(cache, StateCapture):
        raise ModelError("the static gated-DeltaNet layer runs only inside tpugraph's state segments")
    # Python ints, not traced shape values: every Reshape of the segment gets a constant shape.
    batch, seq = int(hidden_states.shape[0]), int(hidden_states.shape[1])
    mixed, z, b, a = self._tpugraph_projections(hidden_states, batch, seq)  # mixed: q|k|v [1, C, S]
    conv = causal_conv_with_state(mixed, self.conv1d.weight.squeeze(1), self.conv1d.bias, cache, seq)
    mixed = F.silu(conv).transpose(1, 2)
    query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    query = query.reshape(batch, seq, -1, self.head_k_dim)
    key = key.reshape(batch, seq, -1, self.head_k_dim)
    value = value.reshape(batch, seq, -1, self.head_v_dim)
    beta = b.sigmoid()
    g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
    if cache.conv_state is None:
        valid = cache.valid.reshape(1, seq, 1)
        out, cache.next_recurrent_state = chunk_gated_delta_rule_static(query, key, value, g * valid, beta * valid)
    else:
        out, cache.next_recurrent_state = recurrent_gated_delta_step(query, key, value, g, beta,
                                                                     cache.recurrent_state)
    out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
    return self.out_proj(out.reshape(batch, seq, -1))


_DELTANET_PARTS = ("conv1d", "norm", "out_proj", "A_log", "dt_bias", "head_k_dim", "head_v_dim", "key_dim",
                   "value_dim")
# The input projections, as transformers lays them out: Qwen3.5's four, or Qwen3-Next's two grouped per key head.
_PROJECTIONS = ((("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"), _separate_projections),
                (("in_proj_qkvz", "in_proj_ba", "num_k_heads", "num_v_heads"), _grouped_projections))
_SILU = ("silu", "swish")  # the conv's activation the static forward applies (F.silu)


def rewrite_gated_deltanet(layer: nn.Module, config: Any) -> None:
    """Replace a linear-attention layer's forward (the exporter's own copy) by the static one; a
    full-attention layer of the same model is left as transformers made it."""
    attn = getattr(layer, "linear_attn", None)
    if attn is None:
        return
    missing = [p for p in _DELTANET_PARTS if not hasattr(attn, p)]
    layouts = [project for parts, project in _PROJECTIONS if all(hasattr(attn, p) for p in parts)]
    if not layouts:
        missing.append("in_proj_qkv/z/b/a or in_proj_qkvz/ba")
    if getattr(attn, "activation", "silu") not in _SILU:
        missing.append(f"a SiLU conv activation (not {attn.activation})")
    if missing:
        raise ModelError(f"{type(attn).__name__}: the static gated-DeltaNet rewrite expects {', '.join(missing)}; "
                         "this layer differs")
    attn._tpugraph_projections = types.MethodType(layouts[0], attn)
    attn.forward = types.MethodType(_gated_deltanet_forward, attn)


def _prompt_rows(attention_mask: torch.Tensor) -> torch.Tensor:
    """[SEQ] 1.0 where the runtime's prefill mask lets a row see itself (a prompt token), else 0.0.

    relu(1 + diagonal): the mask value (-10000 in F32/F16, -9984 in BF16) gives 0, an unmasked 0 gives 1."""
    square = attention_mask[0, 0]
    diagonal = (square * torch.eye(int(square.shape[-1]), dtype=square.dtype)).sum(dim=-1)
    return torch.relu(1.0 + diagonal)


class StateBlockSegment(nn.Module):
    """Prefill of a state layer: (input_states, attention_mask) -> (hidden_states, next_<state>...), the states
    named by ``state_names`` (FamilySpec.state_shapes: conv_state and recurrent_state, or conv_state alone)."""

    def __init__(self, layer: nn.Module, cache_kwarg: str = "cache",
                 state_names: tuple[str, ...] = ("conv_state", "recurrent_state")):
        super().__init__()
        self.layer = layer
        self.cache_kwarg = cache_kwarg
        self.state_names = state_names

    def forward(self, input_states, attention_mask):
        state = StateCapture(valid=_prompt_rows(attention_mask))
        out = self.layer(input_states, position_embeddings=None, attention_mask=None, **{self.cache_kwarg: state})
        hidden = out[0] if isinstance(out, tuple) else out
        return (hidden, *(getattr(state, f"next_{name}") for name in self.state_names))


class StateBlockCacheSegment(nn.Module):
    """Decode of a state layer: (input_states, <state>...) -> (hidden_states, next_<state>...)."""

    def __init__(self, layer: nn.Module, cache_kwarg: str = "cache",
                 state_names: tuple[str, ...] = ("conv_state", "recurrent_state")):
        super().__init__()
        self.layer = layer
        self.cache_kwarg = cache_kwarg
        self.state_names = state_names

    def forward(self, input_states, *states):
        state = StateCapture(**dict(zip(self.state_names, states)))
        out = self.layer(input_states, position_embeddings=None, attention_mask=None, **{self.cache_kwarg: state})
        hidden = out[0] if isinstance(out, tuple) else out
        return (hidden, *(getattr(state, f"next_{name}") for name in self.state_names))
