"""Blocks that take more than the contract's three inputs (Gemma 4): per-layer embeddings and shared KV ->
the weights view, skeleton modules and segment wrappers that carry them.

How they reach the blocks (README, "Gemma 4"), close to tpu-mlir's own Gemma 4 converter:
- ``embedding``/``embedding_cache`` also output ``per_layer_embeds`` [1, S, L, P]: the per-layer table
  gathered and scaled as its module scales it. Block i takes its slice [1, S, P] (``per_layer_embeds``)
  and the token embedding [1, S, H] (``inputs_embeds``), and computes its own rows of the per-layer
  projection of that embedding (rows i*P..(i+1)*P of the model's matrix, norm and scales), then the layer.
- A layer that reuses an earlier layer's KV takes it as ``shared_k``/``shared_v``: in prefill the owner's
  ``past_k``/``past_v`` [1, SEQ, KVH, D]; in decode the owner's history with its new row appended
  [1, SEQ+1, KVH, D] (the columns of the decode mask). It returns no K/V and has no history of its own.

The per-layer projection rows and the norm are given to each layer as its own parameters
(``{layer}.ple_model_projection.weight``, ``{layer}.ple_projection_norm.weight``: a view of the checkpoint,
nothing copied on disk), so a layer's weights stay under its prefix: weight swapping, resume fingerprints and
per-layer data files work as for any layer.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..source.families import FamilySpec
from .rotary import RotaryTable
from .wrappers import _apply_window, _CaptureKV, _layer_cache_kwarg, clamp_mask

PROJECTION = "ple_model_projection"  # names of the per-layer modules added to each decoder layer
NORM = "ple_projection_norm"


class PerLayerWeights:
    """A WeightStore view with each layer's rows of the per-layer projection and a copy of its norm listed
    under the layer (read from the model-level tensors when asked for); every other key passes through."""

    def __init__(self, store, family: FamilySpec, width: int):
        ple = family.per_layer_embedding
        self.store = store
        self._made: dict[str, tuple[str, int | None]] = {}  # key -> (source key, layer whose rows, or None)
        pattern = re.compile(rf"{re.escape(family.layers_path)}\.(\d+)\.")
        layers = sorted({int(m.group(1)) for k in store.keys() if (m := pattern.match(k))})
        self.width = width
        for i in layers:
            prefix = f"{family.layers_path}.{i}."
            self._made[f"{prefix}{PROJECTION}.weight"] = (f"{ple.projection_path}.weight", i)
            self._made[f"{prefix}{NORM}.weight"] = (f"{ple.norm_path}.weight", None)
        self._keys = list(store.keys()) + list(self._made)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._made or key in self.store

    def get(self, key: str) -> torch.Tensor:
        if key not in self._made:
            return self.store.get(key)
        source, layer = self._made[key]
        tensor = self.store.get(source)
        return tensor if layer is None else tensor[layer * self.width:(layer + 1) * self.width].contiguous()

    def shape_and_dtype(self, key: str):
        if key not in self._made:
            return self.store.shape_and_dtype(key)
        source, layer = self._made[key]
        shape, dtype = self.store.shape_and_dtype(source)
        return ((self.width, *shape[1:]) if layer is not None else shape), dtype

    @property
    def quantization(self):
        return getattr(self.store, "quantization", None)


def with_per_layer_weights(store, family: FamilySpec, text_config):
    ple = family.per_layer_embedding
    if ple is None or not ple.width(text_config) or isinstance(store, PerLayerWeights):
        return store
    return PerLayerWeights(store, family, ple.width(text_config))


def attach_per_layer_modules(skeleton: nn.Module, family: FamilySpec, text_config) -> None:
    """Give each decoder layer of the skeleton its rows of the per-layer projection and the norm (on meta)."""
    ple = family.per_layer_embedding
    if ple is None or not ple.width(text_config):
        return
    width = ple.width(text_config)
    projection = skeleton.get_submodule(ple.projection_path)
    norm = skeleton.get_submodule(ple.norm_path)
    for layer in skeleton.get_submodule(family.layers_path):
        rows = nn.Linear(projection.in_features, width, bias=False, device="meta")
        layer.add_module(PROJECTION, rows)
        layer.add_module(NORM, copy.deepcopy(norm))


def _attr(root: nn.Module, dotted: str) -> float:
    owner, _, name = dotted.rpartition(".")
    return float(getattr(root.get_submodule(owner) if owner else root, name))


class PerLayerEmbeddingSegment(nn.Module):
    """input_ids -> (input_embed [1, S, H], per_layer_embeds [1, S, L, P])."""

    def __init__(self, embed: nn.Module, table: nn.Module, scale: float | None, layers: int, width: int):
        super().__init__()
        self.embed = embed
        self.table = table
        self.scale = scale
        self.layers = layers
        self.width = width

    def forward(self, input_ids):
        x = self.embed(input_ids)
        if self.scale is not None:
            x = x * torch.tensor(self.scale, dtype=x.dtype)
        per_layer = self.table(input_ids).reshape(*input_ids.shape, self.layers, self.width)
        return x, per_layer


class _ExtraInputsLayer(nn.Module):
    """A decoder layer that may take a per-layer input and/or another layer's KV (see module docstring)."""

    def __init__(self, layer: nn.Module, rotary: RotaryTable, window: int | None, family: FamilySpec,
                 skeleton: nn.Module, layer_type: str | None, per_layer: bool, shared: bool):
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.window = window
        self.cache_kwarg = _layer_cache_kwarg(layer)
        self.per_layer = per_layer
        self.shared = shared
        self.layer_type = layer_type
        self.kv_kwarg = family.kv_sharing_kwarg
        ple = family.per_layer_embedding
        if per_layer:
            self.layer_kwarg = ple.layer_kwarg
            self.projection_scale = _attr(skeleton, ple.projection_scale_attr)
            self.input_scale = _attr(skeleton, ple.input_scale_attr)

    def _per_layer_input(self, per_layer_embeds, inputs_embeds):
        projected = getattr(self.layer, PROJECTION)(inputs_embeds) * self.projection_scale
        projected = getattr(self.layer, NORM)(projected)
        return (projected + per_layer_embeds) * self.input_scale

    def _split(self, extra):
        extra = list(extra)
        kwargs = {}
        if self.per_layer:
            per_layer_embeds, inputs_embeds = extra[0], extra[1]
            kwargs[self.layer_kwarg] = self._per_layer_input(per_layer_embeds, inputs_embeds)
            extra = extra[2:]
        return kwargs, extra

    def _run(self, x, mask, position_ids, cache, kwargs, shared_kv=None):
        states = {} if shared_kv is None else {self.layer_type: shared_kv}
        out = self.layer(x, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         position_embeddings=self.rotary(position_ids), **{self.cache_kwarg: cache},
                         **{self.kv_kwarg: states}, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class ExtraInputsBlockSegment(_ExtraInputsLayer):
    """Prefill: (input_states, position_ids, attention_mask[, per_layer_embeds, inputs_embeds][, shared_k,
    shared_v]) -> (hidden_states[, past_k, past_v])."""

    def forward(self, input_states, position_ids, attention_mask, *extra):
        attention_mask = clamp_mask(attention_mask)  # any mask value a runtime writes (wrappers.clamp_mask)
        if self.window is not None:
            attention_mask = _apply_window(attention_mask, position_ids, position_ids, self.window)
        kwargs, rest = self._split(extra)
        cache = _CaptureKV()
        if self.shared:
            shared_k, shared_v = rest
            return self._run(input_states, attention_mask, position_ids, cache, kwargs,
                             (shared_k.transpose(1, 2), shared_v.transpose(1, 2)))
        hidden = self._run(input_states, attention_mask, position_ids, cache, kwargs)
        return hidden, cache.new_k.transpose(1, 2), cache.new_v.transpose(1, 2)


class ExtraInputsBlockCacheSegment(_ExtraInputsLayer):
    """Decode: (input_states, position_ids, attention_mask[, per_layer_embeds, inputs_embeds], history_k,
    history_v | shared_k, shared_v [1, SEQ+1, KVH, D]) -> (hidden_states[, past_k, past_v])."""

    def forward(self, input_states, position_ids, attention_mask, *extra):
        attention_mask = clamp_mask(attention_mask)  # any mask value a runtime writes (wrappers.clamp_mask)
        kwargs, (first_k, first_v) = self._split(extra)
        if self.window is not None:
            slots = torch.arange(attention_mask.shape[-1] - 1, dtype=position_ids.dtype)[None]
            key_pos = torch.cat([slots, position_ids], dim=1)
            attention_mask = _apply_window(attention_mask, position_ids, key_pos, self.window)
        if self.shared:
            return self._run(input_states, attention_mask, position_ids, _CaptureKV(), kwargs,
                             (first_k.transpose(1, 2), first_v.transpose(1, 2)))
        cache = _CaptureKV(first_k.transpose(1, 2), first_v.transpose(1, 2))
        hidden = self._run(input_states, attention_mask, position_ids, cache, kwargs)
        return hidden, cache.new_k.transpose(1, 2), cache.new_v.transpose(1, 2)
