"""Family rewrites of a materialised decoder layer: static-shape equivalents of what transformers does in
ways the TorchScript ONNX exporter or tpu-mlir cannot take.

A family names the rewrites it needs in ``FamilySpec.layer_rewrites``; ``adapt_layer`` applies them to the
exporter's own copy of the layer (an instance's ``forward`` is replaced, never a class or a transformers
module function, so nothing process-wide changes). Each rewrite checks the module it rewrites has the
structure it was written for and refuses (ModelError) otherwise, rather than export something different.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelError

# -- interleaved rotary (GLM, GLM-4, ERNIE 4.5) -----------------------------------------------------------


def _interleaved_tables(rotary_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constant index/sign vectors of the interleaved rotation over ``rotary_dim`` lanes.

    transformers widens the table's first half with ``repeat_interleave(2)`` (lane j reads frequency j // 2)
    and rotates pairs with ``stack((-x[1::2], x[0::2]), -1).flatten(-2)`` (lane 2i reads -x[2i+1], lane 2i+1
    reads x[2i]). Both are a Gather with constant indices (and a Mul by constant signs): static, exact.
    """
    lanes = torch.arange(rotary_dim, device=device)
    widen = lanes // 2
    swap = lanes ^ 1
    sign = torch.where(lanes % 2 == 0, -1.0, 1.0)
    return widen, swap, sign


def apply_interleaved_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' GLM ``apply_rotary_pos_emb`` (partial, interleaved pairs) with static ops only.

    ``cos``/``sin`` are the rotary module's [B, S, R] (R = rotary lanes; its halves repeat); q, k are
    [B, H, S, D] with D >= R; lanes R.. pass through unrotated.
    """
    rotary_dim = int(cos.shape[-1])
    widen, swap, sign = _interleaved_tables(rotary_dim)
    cos = cos.index_select(-1, widen).unsqueeze(1)
    sin = sin.index_select(-1, widen).unsqueeze(1)
    sign = sign.to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        rotated = x_rot.float() * cos + (x_rot.index_select(-1, swap) * sign).float() * sin
        rotated = rotated.to(x.dtype)
        return rotated if x_pass.shape[-1] == 0 else torch.cat([rotated, x_pass], dim=-1)

    return rotate(q), rotate(k)


_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _interleaved_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                                   cache=None, past_key_values=None, **kwargs):
    """The Llama-shaped attention forward of GLM/GLM-4/ERNIE 4.5 with ``apply_interleaved_rotary``."""
    cache = cache if cache is not None else past_key_values
    eager = sys.modules[type(self).__module__].eager_attention_forward
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_interleaved_rotary(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    out, weights = eager(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _rewrite_interleaved_rotary(layer: nn.Module, config: Any) -> None:
    attn = getattr(layer, "self_attn", None)
    module = sys.modules.get(type(attn).__module__) if attn is not None else None
    missing = [p for p in _ATTENTION_PARTS if not isinstance(getattr(attn, p, None), nn.Linear)]
    if attn is None or missing or not hasattr(attn, "head_dim") or not hasattr(attn, "scaling") \
            or not hasattr(module, "eager_attention_forward") or hasattr(attn, "q_norm"):
        raise ModelError(f"{type(layer).__name__}: the interleaved-rotary rewrite expects a Llama-shaped self_attn "
                         f"(q/k/v/o_proj, head_dim, scaling, no q/k norm); this one differs "
                         f"({type(attn).__name__}{', missing ' + ', '.join(missing) if missing else ''})")
    attn.forward = types.MethodType(_interleaved_attention_forward, attn)


# -- mixture of experts (Qwen2-MoE, Qwen3-MoE, Mixtral) ---------------------------------------------------


def moe_experts_all(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, each weighted by its routing weight (0 when not in the token's top k).

    Exact: an expert outside the top k contributes 0 * its output. The experts' gate/up and down matrices
    are two ordinary 2-D MatMul weights over all experts ([E*2I, H] as stored; [E*I, H] transposed), so
    they stay weights a quantizing compiler can take. Costs E/k times the routed work.
    """
    tokens, hidden_dim = hidden.shape
    n_experts, two_i, _ = experts.gate_up_proj.shape
    inter = two_i // 2
    experts_ids = torch.arange(n_experts, dtype=top_k_index.dtype)
    onehot = (top_k_index.unsqueeze(-1) == experts_ids).to(hidden.dtype)  # [T, k, E]
    routing = (onehot * top_k_weights.to(hidden.dtype).unsqueeze(-1)).sum(dim=1)  # [T, E]
    gate_up = hidden @ experts.gate_up_proj.reshape(n_experts * two_i, hidden_dim).t()  # [T, E*2I]
    gate_up = gate_up.reshape(tokens, n_experts, 2, inter)
    gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
    act = experts.act_fn(gate) * up * routing.unsqueeze(-1)  # [T, E, I]
    down = experts.down_proj.transpose(1, 2).reshape(n_experts * inter, hidden_dim)  # [E*I, H]
    # 3-D on purpose: onnxsim fuses a 2-D MatMul and a following Add of an activation (Qwen2-MoE's shared
    # expert) into Gemm(C=activation), which tpu-mlir 1.30 converts as a per-column bias (cosine 0.84).
    return (act.reshape(1, tokens, n_experts * inter) @ down).reshape(tokens, hidden_dim)


def moe_experts_gathered(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """One token: gather the k chosen experts' matrices by the router's indices and run only those.

    Gather(weights, indices) -> [k, 2I, H] and [k, H, I]; the token is the left operand of two batched
    MatMuls over k (row vectors out: [k, 1, 2I] and [k, 1, H]; a column-vector [k, 2I, 1] form costs
    tpu-mlir strided stores), then a sum over k. The gathered matrices are data to the MatMuls, so a
    weight-only quantizer leaves them in float.
    """
    hidden_dim = hidden.shape[-1]
    inter = experts.gate_up_proj.shape[1] // 2
    index = top_k_index.reshape(-1)  # [k]
    k = index.shape[0]
    token = hidden.reshape(1, 1, hidden_dim)
    gate_up = token @ experts.gate_up_proj.index_select(0, index).transpose(1, 2)  # [k, 1, 2I]
    gate, up = gate_up[..., :inter], gate_up[..., inter:]
    act = experts.act_fn(gate) * up * top_k_weights.reshape(k, 1, 1).to(hidden.dtype)  # [k, 1, I]
    out = act @ experts.down_proj.index_select(0, index).transpose(1, 2)  # [k, 1, H]
    return out.sum(dim=0).reshape(1, hidden_dim)


def _static_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' Experts.forward (a loop over the experts hit, with nonzero/index_add) with static shapes:
    gathered experts for one token (decode), every expert weighted by the routing for a prefill."""
    if hidden_states.shape[0] == 1 and self._tpugraph_decode == "gather":
        return moe_experts_gathered(self, hidden_states, top_k_index, top_k_weights)
    return moe_experts_all(self, hidden_states, top_k_index, top_k_weights)


# Where a decoder layer keeps its routed experts: mlp.experts (Qwen-MoE, Mixtral), feed_forward.experts (LFM2-MoE),
# experts (Gemma 4's MoE, beside its dense mlp).
_EXPERTS_PATHS = (("mlp", "experts"), ("feed_forward", "experts"), ("experts",))


def _layer_experts(layer: nn.Module) -> nn.Module | None:
    for path in _EXPERTS_PATHS:
        module = layer
        for name in path:
            module = getattr(module, name, None)
        if module is not None:
            return module
    return None


def _rewrite_sparse_moe(layer: nn.Module, config: Any, decode: str = "gather") -> None:
    experts = _layer_experts(layer)
    if experts is None:
        return  # a dense layer of an MoE model (mlp_only_layers, decoder_sparse_step), or a dense checkpoint
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    ok = isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3 \
        and down.dim() == 3 and down.shape[1] == gate_up.shape[2] and down.shape[2] * 2 == gate_up.shape[1] \
        and hasattr(experts, "act_fn") and not any(n.endswith("bias") for n, _ in experts.named_parameters()) \
        and not getattr(experts, "is_transposed", False)
    if not ok:
        raise ModelError(f"{type(experts).__name__}: the static mixture-of-experts rewrite expects fused "
                         "gate_up_proj [E, 2I, H] and down_proj [E, H, I] without biases; this one differs")
    experts._tpugraph_decode = decode
    experts.forward = types.MethodType(_static_experts_forward, experts)


# -- gpt-oss experts: x @ W layout, biases, interleaved gate/up lanes, clamped SwiGLU --------------------


def _gpt_oss_gate(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """GptOssExperts._apply_gate on [..., 2I] with gate/up in even/odd lanes, as a reshape to pairs."""
    pairs = gate_up.reshape(*gate_up.shape[:-1], gate_up.shape[-1] // 2, 2)
    gate, up = pairs[..., 0], pairs[..., 1]
    gate = torch.minimum(gate, torch.tensor(experts.limit, dtype=gate.dtype))
    up = up.clamp(min=-experts.limit, max=experts.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * experts.alpha))


def gpt_oss_experts_all(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the routing (0 outside the top k); biases weighted alike."""
    tokens, hidden_dim = hidden.shape
    n_experts, _, two_i = experts.gate_up_proj.shape
    inter = two_i // 2
    experts_ids = torch.arange(n_experts, dtype=top_k_index.dtype)
    onehot = (top_k_index.unsqueeze(-1) == experts_ids).to(hidden.dtype)
    routing = (onehot * top_k_weights.to(hidden.dtype).unsqueeze(-1)).sum(dim=1)  # [T, E]
    gate_up = hidden @ experts.gate_up_proj.transpose(0, 1).reshape(hidden_dim, n_experts * two_i)
    gate_up = gate_up.reshape(tokens, n_experts, two_i) + experts.gate_up_proj_bias
    act = _gpt_oss_gate(experts, gate_up) * routing.unsqueeze(-1)  # [T, E, I]
    out = act.reshape(1, tokens, n_experts * inter) @ experts.down_proj.reshape(n_experts * inter, hidden_dim)
    return out.reshape(tokens, hidden_dim) + routing @ experts.down_proj_bias


def gpt_oss_experts_gathered(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """One token through the k gathered experts (weights and biases gathered by the router's indices)."""
    hidden_dim = hidden.shape[-1]
    index = top_k_index.reshape(-1)
    k = index.shape[0]
    token = hidden.reshape(1, 1, hidden_dim)
    gate_up = token @ experts.gate_up_proj.index_select(0, index) \
        + experts.gate_up_proj_bias.index_select(0, index).unsqueeze(1)  # [k, 1, 2I]
    act = _gpt_oss_gate(experts, gate_up)  # [k, 1, I]
    out = act @ experts.down_proj.index_select(0, index) + experts.down_proj_bias.index_select(0, index).unsqueeze(1)
    return (out * top_k_weights.reshape(k, 1, 1).to(hidden.dtype)).sum(dim=0).reshape(1, hidden_dim)


def _gpt_oss_experts_forward(self, hidden_states, router_indices=None, routing_weights=None):
    if hidden_states.shape[0] == 1:
        return gpt_oss_experts_gathered(self, hidden_states, router_indices, routing_weights)
    return gpt_oss_experts_all(self, hidden_states, router_indices, routing_weights)


def _rewrite_gpt_oss_moe(layer: nn.Module, config: Any) -> None:
    experts = getattr(getattr(layer, "mlp", None), "experts", None)
    names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias", "alpha", "limit")
    if experts is None or not all(hasattr(experts, n) for n in names) or experts.gate_up_proj.dim() != 3 \
            or experts.down_proj.shape[1] * 2 != experts.gate_up_proj.shape[2]:
        raise ModelError(f"{type(experts).__name__}: the gpt-oss experts rewrite expects gate_up_proj [E, H, 2I] "
                         "with interleaved gate/up lanes, down_proj [E, I, H] and their biases; this one differs")
    experts.forward = types.MethodType(_gpt_oss_experts_forward, experts)


def _rewrite_gated_deltanet(layer: nn.Module, config: Any) -> None:
    from .linear_attention import rewrite_gated_deltanet

    rewrite_gated_deltanet(layer, config)


def _rewrite_short_conv(layer: nn.Module, config: Any) -> None:
    from .short_conv import rewrite_short_conv

    rewrite_short_conv(layer, config)


REWRITES: dict[str, Callable[[nn.Module, Any], None]] = {
    "gated_deltanet": _rewrite_gated_deltanet,  # Qwen3.5 linear attention: static, states in and out
    "short_conv": _rewrite_short_conv,  # LFM2 gated short convolution: static, conv state in and out
    "gpt_oss_moe": _rewrite_gpt_oss_moe,
    "interleaved_rotary": _rewrite_interleaved_rotary,
    "sparse_moe": _rewrite_sparse_moe,
    # every expert at decode too (exact, E/k times the work, weights stay 2-D MatMul weights)
    "sparse_moe_all": functools.partial(_rewrite_sparse_moe, decode="all"),
}


def adapt_layer(rewrites: tuple[str, ...], layer: nn.Module, config: Any) -> nn.Module:
    """Apply the named rewrites to ``layer`` (the exporter's own copy) in order; returns the layer."""
    for name in rewrites:
        REWRITES[name](layer, config)
    return layer
