"""A WeightStore view with the tensors transformers fuses on load (MoE experts), made from the checkpoint's own.

transformers 5 keeps a mixture-of-experts layer's experts as two 3-D parameters (``experts.gate_up_proj``
[E, 2I, H] and ``experts.down_proj`` [E, H, I]) while checkpoints store one 2-D matrix per expert and
projection (``experts.{e}.gate_proj.weight``...). A family declares each fused parameter with the
checkpoint keys it is made of (``FamilySpec.fused_weights``); this view answers for the fused key by
stacking the experts' concatenated sources, read when asked for, and passes every other key through.
A checkpoint that already stores the fused key is read as it is.
"""

from __future__ import annotations

import re

import torch

from ..errors import ModelError

_EXPERT = "{e}"


class FusedWeights:
    """``keys / __contains__ / get / shape_and_dtype`` of a WeightStore, with the declared fused keys listed
    in place of the checkpoint keys they are made of."""

    def __init__(self, store, fusions: tuple[tuple[str, tuple[str, ...]], ...], layers_path: str):
        self.store = store
        self._sources: dict[str, tuple[list[str], bool]] = {}  # fused key -> (source keys in order, stacked)
        keys = store.keys()
        layer_prefixes = sorted({m.group(0) for k in keys if (m := re.match(rf"{re.escape(layers_path)}\.\d+\.", k))})
        for prefix in layer_prefixes:
            for target, templates in fusions:
                if prefix + target in store:
                    continue
                stacked = any(_EXPERT in t for t in templates)
                sources = []
                if stacked:
                    pattern = re.compile(re.escape(prefix + templates[0]).replace(re.escape(_EXPERT), r"(\d+)") + "$")
                    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
                    for e in range(max(found) + 1 if found else 0):
                        missing = [prefix + t.format(e=e) for t in templates if prefix + t.format(e=e) not in store]
                        if missing:
                            raise ModelError(f"weight '{missing[0]}' is missing from the model's safetensors "
                                             f"(needed for {prefix + target})")
                        sources += [prefix + t.format(e=e) for t in templates]
                elif all(prefix + t in store for t in templates):
                    sources = [prefix + t for t in templates]
                if sources:
                    self._sources[prefix + target] = (sources, stacked, len(templates))
        # The checkpoint as transformers sees it: the fused keys instead of the tensors they are made of
        # (which stay readable by name), so a layer's parameter list is its module's.
        consumed = {k for sources, _, _ in self._sources.values() for k in sources}
        self._keys = [k for k in keys if k not in consumed] + [k for k in self._sources if k not in set(keys)]

    @property
    def fused_keys(self) -> list[str]:
        return list(self._sources)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._sources or key in self.store

    def get(self, key: str) -> torch.Tensor:
        if key not in self._sources:
            return self.store.get(key)
        sources, stacked, per = self._sources[key]
        tensors = [self.store.get(k) for k in sources]
        groups = [torch.cat(tensors[i:i + per], dim=0) for i in range(0, len(tensors), per)]
        return torch.stack(groups) if stacked else groups[0]

    def shape_and_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        if key not in self._sources:
            return self.store.shape_and_dtype(key)
        sources, stacked, per = self._sources[key]
        shapes = [self.store.shape_and_dtype(k) for k in sources[:per]]
        dtypes = {d for _, d in shapes}
        if len(dtypes) != 1 or len({s[1:] for s, _ in shapes}) != 1:
            raise ModelError(f"the checkpoint tensors of '{key}' ({', '.join(sources[:per])}) differ in dtype or shape")
        rows = sum(s[0] for s, _ in shapes)
        shape = (rows, *shapes[0][0][1:])
        return ((len(sources) // per, *shape) if stacked else shape), dtypes.pop()


def with_fused_weights(store, family):
    """``store`` seen with the family's fused tensors (the store itself when the family declares none)."""
    if not family.fused_weights or isinstance(store, FusedWeights):
        return store
    view = FusedWeights(store, family.fused_weights, family.layers_path)
    return view if view.fused_keys else store
