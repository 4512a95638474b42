"""Hugging Face modules -> torch modules whose signatures are exactly the segments of the contract."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..contract.segments import MASK_VALUE
from .rotary import RotaryTable


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


class EmbeddingSegment(nn.Module):
    def __init__(self, embed: nn.Module, scale: float | None = None):
        super().__init__()
        self.embed = embed
        self.scale = scale

    def forward(self, input_ids):
        x = self.embed(input_ids)
        if self.scale is not None:
            # Cast like the HF model forward does (the scale is rounded to the weight dtype).
            x = x * torch.tensor(self.scale, dtype=x.dtype)
        return x


def _rotary_kwargs(layer: nn.Module) -> tuple[str, ...]:
    """The keyword(s) a decoder layer takes cos/sin under. Gemma 3 on transformers 4.x takes a global
    and a local pair and picks one by its own layer type; the table given is already that layer's."""
    params = inspect.signature(layer.forward).parameters
    split = ("position_embeddings_global", "position_embeddings_local")
    return split if all(p in params for p in split) else ("position_embeddings",)


def _call_layer(layer: nn.Module, cache_kwarg: str, x, mask, position_ids, rotary, cache: _CaptureKV):
    out = layer(
        x,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        **{cache_kwarg: cache},
        **{name: rotary for name in _rotary_kwargs(layer)},
    )
    return out[0] if isinstance(out, tuple) else out


def _apply_window(mask: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Mask keys ``window`` or more positions behind the query, as HF's sliding-window mask does.

    ``query_pos`` is [1, Q] and ``key_pos`` [1, K] (absolute positions); ``mask`` is [1, 1, Q, K].
    """
    distance = query_pos[:, None, :, None] - key_pos[:, None, None, :]
    return torch.where(distance >= window, torch.full_like(mask, MASK_VALUE), mask)


class _LayerSegment(nn.Module):
    """A decoder layer with its rotary table. ``window``: the layer's sliding window when SEQ exceeds it;
    the window is then applied here from position_ids, so the runtime's plain causal mask stays the contract's.
    """

    def __init__(self, layer: nn.Module, rotary: RotaryTable, window: int | None = None):
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.window = window
        self.cache_kwarg = _layer_cache_kwarg(layer)


def clamp_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The mask with every value below the contract's MASK_VALUE raised to it (one Clip node).

    Runtimes write "masked" as a raw 16-bit pattern that depends on the demo: 0xF0E2 (-10000 in F16) read
    by a BF16 net is about -5.5e29, the lowest finite value of the float type is possible too. Past -10000
    exp() is 0 in every float type anyway, and from here on no intermediate can overflow: the block's
    result is the same for any mask value from MASK_VALUE down to the float type's lowest.
    """
    return torch.clamp(attention_mask, min=MASK_VALUE)


class BlockSegment(_LayerSegment):
    """Prefill: (input_states, position_ids, attention_mask) -> (hidden_states, past_k, past_v)."""

    def forward(self, input_states, position_ids, attention_mask):
        attention_mask = clamp_mask(attention_mask)
        if self.window is not None:
            attention_mask = _apply_window(attention_mask, position_ids, position_ids, self.window)
        cache = _CaptureKV()
        hidden = _call_layer(self.layer, self.cache_kwarg, input_states, attention_mask, position_ids,
                             self.rotary(position_ids), cache)
        # Hugging Face keeps KV head-major [1, KVH, S, D]; the TPU runtime wants sequence-major.
        return hidden, cache.new_k.transpose(1, 2), cache.new_v.transpose(1, 2)


class BlockCacheSegment(_LayerSegment):
    """Decode: (input_states, position_ids, attention_mask, history_k, history_v) -> (hidden_states, past_k, past_v).

    History slot ``c`` holds the token at position ``c`` (the runtime writes row n for position n), so
    the key positions of a window check are 0..SEQ-1 followed by the new token's own position.
    """

    def forward(self, input_states, position_ids, attention_mask, history_k, history_v):
        attention_mask = clamp_mask(attention_mask)
        if self.window is not None:
            slots = torch.arange(history_k.shape[1], dtype=position_ids.dtype)[None]
            key_pos = torch.cat([slots, position_ids], dim=1)
            attention_mask = _apply_window(attention_mask, position_ids, key_pos, self.window)
        cache = _CaptureKV(history_k.transpose(1, 2), history_v.transpose(1, 2))
        hidden = _call_layer(self.layer, self.cache_kwarg, input_states, attention_mask, position_ids,
                             self.rotary(position_ids), cache)
        return hidden, cache.new_k.transpose(1, 2), cache.new_v.transpose(1, 2)


class BlockKvSegment(BlockCacheSegment):
    """Prefill on top of a history (``block_kv_i``, CONTRACT.md second table): (input_states [1,L,H],
    position_ids [1,L], attention_mask [1,1,L,SEQ+L], history_k, history_v) -> (hidden_states [1,L,H],
    past_k [1,L,KVH,D], past_v): the decode block's computation over L new tokens instead of one, attending
    over the SEQ history slots followed by the new tokens themselves; only the new keys/values come out.
    """


class LoraInputs(nn.Module):
    """A block segment whose linears also take LoRA inputs (--lora-max-rank): after the segment's own inputs, per
    linear of ``linears`` (its path inside ``layer``), A [R, in] and B [R, out] (the runtime folds the scale into
    B and pads a rank r <= R with zero rows), and the linear's output becomes ``W x + (x A^T) B``. Zeros give the
    base model. The additions are forward hooks on this export's own copy of the layer, removed after the call."""

    def __init__(self, inner: nn.Module, layer: nn.Module, linears: tuple[str, ...], n_inputs: int):
        super().__init__()
        self.inner = inner
        self._layer = [layer]  # the inner segment's own layer (not registered twice)
        self.linears = linears
        self.n_inputs = n_inputs

    def forward(self, *args):
        inputs, lora = args[: self.n_inputs], args[self.n_inputs:]
        handles = []
        for i, path in enumerate(self.linears):
            a, b = lora[2 * i], lora[2 * i + 1]
            hook = lambda _m, x, y, a=a, b=b: y + torch.matmul(torch.matmul(x[0], a.t()), b)  # noqa: E731
            handles.append(self._layer[0].get_submodule(path).register_forward_hook(hook))
        try:
            return self.inner(*inputs)
        finally:
            for handle in handles:
                handle.remove()


class _LinearTransB(torch.autograd.Function):
    """x @ W.T (+ b), exported as one Gemm(transB=1) on W as stored, not MatMul on a transposed copy."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = x @ weight.t()
        return y if bias is None else y + bias

    @staticmethod
    def symbolic(g, x, weight, bias):
        if bias is None or (hasattr(bias, "node") and bias.node().mustBeNone()):
            return g.op("Gemm", x, weight, transB_i=1)
        return g.op("Gemm", x, weight, bias, transB_i=1)


class LmHeadSegment(nn.Module):
    """Final norm, output projection, logit scaling and soft-capping: [1, H] -> [1, V].

    With ``greedy`` the segment also takes the top-1 and returns ``(token [1, 1], m_logits [1, V])``:
    token first, so a runtime that reads output 0 of lm_head as the next token works unchanged.
    With ``token_only`` as well it returns the token alone (the current runtime's top-k lm_head).
    """

    def __init__(self, norm: nn.Module, lm_head: nn.Module, softcap: float | None = None,
                 scale: float | None = None, greedy: bool = False, int_dtype: torch.dtype = torch.int32,
                 token_only: bool = False):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.softcap = softcap
        self.scale = scale
        self.greedy = greedy or token_only
        self.token_only = token_only
        self.int_dtype = int_dtype

    def forward(self, hidden_states):
        normed = self.norm(hidden_states)
        if isinstance(self.lm_head, nn.Linear) and normed.dim() == 2:
            # Gemm(transB=1) reads the [V, H] matrix as stored: a tied head then shares the embedding's bytes.
            logits = _LinearTransB.apply(normed, self.lm_head.weight, self.lm_head.bias)
        else:
            logits = self.lm_head(normed)
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if not self.greedy:
            return logits
        token = torch.argmax(logits, dim=-1, keepdim=True).to(self.int_dtype)
        return token if self.token_only else (token, logits)


class GreedyHeadSegment(nn.Module):
    """[1, V] logits -> [1, 1] argmax token."""

    def __init__(self, int_dtype: torch.dtype = torch.int32):
        super().__init__()
        self.int_dtype = int_dtype

    def forward(self, m_logits):
        return torch.argmax(m_logits, dim=-1, keepdim=True).to(self.int_dtype)


def _penalised_top_k(m_logits, input_ids, penalty, temperature, k: int):
    """What both sample heads do first: the repetition penalty on the logits of ``input_ids`` (divided when
    positive, multiplied when negative), then the K largest logits and their softmax at ``temperature``."""
    ids = input_ids.to(torch.int64)
    seen = torch.gather(m_logits, 1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    logits = m_logits.scatter(1, ids, seen)
    top_logits, token = torch.topk(logits, k, dim=1)
    return torch.softmax(top_logits / temperature, dim=1), token


class PenaltySampleHeadSegment(nn.Module):
    """(m_logits [1,V], input_ids [1,SEQ], top_p [1], temperature [1], penalty [1]) -> (probs [1,K], token [1,K]).

    The order of transformers' sampling processors:
    1. repetition penalty on every token id in ``input_ids`` (once per distinct id, as HF does):
       a logit ``x`` becomes ``x * penalty`` when negative, else ``x / penalty``;
    2. the K largest logits, in descending order (``token`` are their ids);
    3. softmax of those K logits / temperature;
    4. top-p (nucleus): keep a token when the probability mass *before* it is < top_p, so the most
       likely token is always kept; at least ``min_tokens_to_keep`` tokens are kept;
    5. ``probs`` = the kept probabilities renormalised to sum 1, 0 for the dropped ones.

    The runtime draws an index i from ``probs`` and emits ``token[0, i]``. Every id in ``input_ids`` is
    penalised, padding included: pad with an id already in the prompt, not 0, unless 0 should be.
    """

    def __init__(self, top_k: int = 50, min_tokens_to_keep: int = 1, int_dtype: torch.dtype = torch.int32):
        super().__init__()
        self.top_k = top_k
        self.min_tokens_to_keep = min_tokens_to_keep
        self.int_dtype = int_dtype

    def forward(self, m_logits, input_ids, top_p, temperature, penalty):
        probs, token = _penalised_top_k(m_logits, input_ids, penalty, temperature, self.top_k)
        mass_before = torch.cumsum(probs, dim=1) - probs
        rank = torch.arange(self.top_k)[None]
        # "mass before < top_p, or among the first min_tokens_to_keep": no Or with a constant operand,
        # which tpu-mlir 1.30's Or converter cannot take.
        keep = (mass_before - 2.0 * (rank < self.min_tokens_to_keep).to(probs.dtype)) < top_p
        kept = torch.where(keep, probs, torch.zeros_like(probs))
        return kept / kept.sum(dim=1, keepdim=True), token.to(self.int_dtype)


class SampleHeadSegment(nn.Module):
    """The current runtime's sample_head (CONTRACT.md, second table):
    (m_logits [1,V], input_ids [1,SEQ], penalty [1], temperature [1], top_k [1] int, top_p [1])
    -> (probs [1,K], token_idx [1,K]), K = 50.

    transformers' order of the processors: repetition penalty (once per distinct id in ``input_ids``, any
    length: the runtime may pass fewer recent tokens to a dynamic net), temperature, top-k, top-p:
    1. ``token_idx``: the K largest penalised logits, descending;
    2. their softmax at ``temperature``, zero from rank ``top_k`` on (``top_k`` < 1 keeps one token,
       ``top_k`` > K keeps K);
    3. top-p over what is left: a token stays when the mass *before* it is < ``top_p``; the first always stays;
    4. ``probs``: what stays, renormalised to sum 1. The host draws an index i and emits ``token_idx[0, i]``.
    """

    def __init__(self, top_k: int = 50, int_dtype: torch.dtype = torch.int32):
        super().__init__()
        self.top_k = top_k
        self.int_dtype = int_dtype

    def forward(self, m_logits, input_ids, penalty, temperature, top_k, top_p):
        probs, token = _penalised_top_k(m_logits, input_ids, penalty, temperature, self.top_k)
        rank = torch.arange(self.top_k, dtype=probs.dtype)[None]
        first = (rank < 1.0).to(probs.dtype)  # no Or: tpu-mlir 1.30's Or converter takes no constant operand
        in_k = (rank - 2.0 * first) < top_k.to(probs.dtype)
        probs = torch.where(in_k, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(dim=1, keepdim=True)
        mass_before = torch.cumsum(probs, dim=1) - probs
        keep = (mass_before - 2.0 * first) < top_p
        kept = torch.where(keep, probs, torch.zeros_like(probs))
        return kept / kept.sum(dim=1, keepdim=True), token.to(self.int_dtype)


class FloatBoundary(nn.Module):
    """Float32 at the segment's inputs and outputs, ``compute_dtype`` inside (the --dtype of the weights).

    The contract's float I/O stays float32 whatever the weights are, so the runtime and the history
    buffers never change with --dtype; the casts are the only extra nodes.
    """

    def __init__(self, inner: nn.Module, compute_dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        self.compute_dtype = compute_dtype

    def forward(self, *inputs):
        cast_in = [x.to(self.compute_dtype) if x.is_floating_point() else x for x in inputs]
        out = self.inner(*cast_in)
        if isinstance(out, tuple):
            return tuple(o.to(torch.float32) if o.is_floating_point() else o for o in out)
        return out.to(torch.float32) if out.is_floating_point() else out
