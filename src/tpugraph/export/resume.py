"""Segment spec + model + options -> a fingerprint, so a rerun can keep every segment that is already done."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ..contract.segments import SegmentKind, SegmentSpec
from ..source.families import FamilySpec
from ..source.weights import WeightStore


def segment_weight_prefixes(family: FamilySpec, spec: SegmentSpec) -> list[str]:
    """Checkpoint key prefixes of the weights a segment is made of."""
    ple = family.per_layer_embedding
    if spec.kind == SegmentKind.VIT:
        projector = family.vision.projector_path
        return [f"{family.vision.path}."] + ([f"{projector}."] if projector else [])
    if spec.kind in (SegmentKind.EMBEDDING, SegmentKind.EMBEDDING_CACHE):
        return [f"{family.embed_path}."] + ([f"{ple.table_path}."] if spec.per_layer else [])
    if spec.kind in (SegmentKind.BLOCK, SegmentKind.BLOCK_KV, SegmentKind.BLOCK_CACHE):
        extra = [f"{ple.projection_path}.", f"{ple.norm_path}."] if spec.per_layer else []
        return [f"{family.layers_path}.{spec.layer}."] + extra
    if spec.kind == SegmentKind.LM_HEAD:
        # A tied head reads the embedding matrix: include it either way, it is what the head is made of.
        return [f"{family.norm_path}.", f"{family.lm_head_path}.", f"{family.embed_path}."]
    return []


def weights_digest(weights: WeightStore, prefixes: list[str]) -> str:
    """sha256 over name, dtype, shape and bytes of every tensor under the prefixes, one tensor at a time."""
    h = hashlib.sha256()
    for key in sorted(k for k in weights.keys() if any(k.startswith(p) for p in prefixes)):
        tensor = weights.get(key).contiguous()
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        del tensor
    return h.hexdigest()


def unit_fingerprint(specs: list[SegmentSpec], prefixes: list[str], data_file: str | None, weights: WeightStore,
                     config: dict[str, Any], options: dict[str, Any], chain: list[dict[str, Any]],
                     tool_versions: dict[str, str]) -> str:
    """A digest of everything a unit of segments is made from: specs, config, options, chain, tools, weights."""
    payload = {
        "segments": [{"name": s.name, "kind": s.kind.value, "layer": s.layer,
                      "inputs": [t.to_json() for t in s.inputs], "outputs": [t.to_json() for t in s.outputs]}
                     for s in specs],
        "data_file": data_file,
        "config": config,
        "options": options,
        "chain": chain,
        "tools": tool_versions,
        "weights": weights_digest(weights, prefixes),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
