"""The pure plan of an export: work units (segments written together), which unit's graph others reuse
(the scheduler's order constraints), and which finished segments an earlier run left that can be kept."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

from ..contract.manifest import MANIFEST_NAME, PARTIAL_NAME, SegmentEntry, read_manifest, sha256_file
from ..contract.segments import SegmentSpec
from ..errors import TpugraphError
from ..source.weights import WeightStore

EXTERNAL_MIN_BYTES = 16 * 1024 * 1024  # auto: a unit with more weights than this shares one external-data file


@dataclass
class WorkUnit:
    """Segments exported, written and resumed together because they hold the same weights."""

    name: str
    specs: list[SegmentSpec]
    weight_prefixes: list[str]
    data_file: str | None = None  # the external-data file the unit's segments share, if any


def plan_units(specs: list[SegmentSpec], family, weights: WeightStore, dtype_bytes: int,
               external_data: str) -> list[WorkUnit]:
    """vocab (embedding, embedding_cache, lm_head), one unit per layer (block_i, block_cache_i), then the heads."""
    from ..contract.segments import SegmentKind
    from .resume import segment_weight_prefixes

    units: dict[str, WorkUnit] = {}
    for spec in specs:
        if spec.kind in (SegmentKind.EMBEDDING, SegmentKind.EMBEDDING_CACHE, SegmentKind.LM_HEAD):
            name = "vocab"
        elif spec.layer is not None:
            name = f"layer_{spec.layer}"
        else:
            name = spec.name
        unit = units.setdefault(name, WorkUnit(name, [], []))
        unit.specs.append(spec)
        for prefix in segment_weight_prefixes(family, spec):
            if prefix not in unit.weight_prefixes:
                unit.weight_prefixes.append(prefix)
    for unit in units.values():
        if not unit.weight_prefixes or external_data == "never":
            continue
        nbytes = sum(math.prod(weights.shape_and_dtype(k)[0]) * dtype_bytes
                     for k in weights.keys() if any(k.startswith(p) for p in unit.weight_prefixes))
        if external_data == "always" or nbytes >= EXTERNAL_MIN_BYTES:
            unit.data_file = f"{unit.name}.data"
    order = {spec.name: i for i, spec in enumerate(specs)}
    return sorted(units.values(), key=lambda u: order[u.specs[0].name])


def leaders(units: list[WorkUnit], key_of: Callable[[WorkUnit], Hashable | None]) -> dict[str, str]:
    """Unit name -> the unit that must finish before it starts: the first unit (in plan order) with the same
    layer structure ``key_of(unit)``, whose optimised graph the others reuse (weight swapping). Units whose
    key is None, and the first of each key, have no constraint. This is what makes the output of a parallel
    run byte-identical to a one-job run."""
    first: dict[Hashable, str] = {}
    after: dict[str, str] = {}
    for unit in units:
        key = key_of(unit)
        if key is None:
            continue
        if key in first:
            after[unit.name] = first[key]
        else:
            first[key] = unit.name
    return after


def previous_entries(out_dir: Path) -> dict[str, SegmentEntry]:
    """Segments an earlier run into OUT finished (from its manifest, or its partial manifest)."""
    for name in (MANIFEST_NAME, PARTIAL_NAME):
        path = out_dir / name
        if path.is_file():
            try:
                return {s.name: s for s in read_manifest(out_dir, name).segments}
            except TpugraphError:
                return {}
    return {}


def still_valid(entry: SegmentEntry, out_dir: Path, fingerprint: str, digests: dict[str, str]) -> bool:
    """The entry was made from the same inputs and its files are as it recorded them. ``digests`` caches
    the sha256 of files already read in this check (a data file shared by a unit's segments)."""
    if entry.fingerprint != fingerprint:
        return False
    files = [(entry.file, entry.size, entry.sha256)] + [(e.file, e.size, e.sha256) for e in entry.external_data]
    for name, size, digest in files:
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
        if name not in digests:
            digests[name] = sha256_file(path)
        if digests[name] != digest:
            return False
    return True


