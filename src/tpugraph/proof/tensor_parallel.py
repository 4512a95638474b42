"""The tensor-parallel shard proof: OUT's blocks cut over N devices as tpu-mlir's --dev-parallel pass cuts them,
each device's shard run in onnxruntime, the partial results reduced like the runtime, compared with the whole block.

Per device and block, two ONNX graphs (docs/explanation/tensor-parallel.md):

- attention shard: (input_states, position_ids, attention_mask[, history_k, history_v]) -> (partial, past_k, past_v):
  the input norm (whole), this device's Q/K/V rows (whole heads), rotary, attention, its columns of O; device 0 adds
  the residual (and O's bias), the others do not (tpu-mlir multiplies the residual by 1 and 0);
- MLP shard: hidden -> partial: the post-attention norm (whole), this device's gate/up rows and down columns; device 0
  adds the residual (and down's bias).

The hidden state is the sum of the partials after each half (the two all-reduces of a block); the KV cache of the
whole block is the devices' KV caches laid side by side on the head axis (one device per KV head when KV heads are
copied). What this cannot show: the inter-device all-reduce itself and tpu-mlir's own split of the graph.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..compiler.tensor_parallel import DeviceShard, TensorSplit, tensor_split
from ..contract.manifest import Manifest, SegmentEntry, read_manifest
from ..contract.segments import MASK_VALUE, SegmentKind
from ..errors import UnsupportedModelError, UsageError, VerificationError

log = logging.getLogger(__name__)

# (min cosine, max |diff| / max |whole|) of each output against the whole block, by the export's weight dtype. In
# float32 only the order of the additions differs; 16-bit shards round their partial sums on their own.
SHARD_THRESHOLDS = {"float32": (0.99999, 1e-4), "float16": (0.999, 1e-2), "bfloat16": (0.995, 5e-2)}
# The decoder layer shape the split applies to: pre-norm attention and pre-norm gated MLP, each added to the residual.
LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SHARDED_KINDS = (SegmentKind.BLOCK, SegmentKind.BLOCK_CACHE)


@dataclass
class ShardCheck:
    segment: str
    output: str
    cosine: float
    max_abs_diff: float
    rel_diff: float
    min_cosine: float
    max_rel_diff: float

    @property
    def ok(self) -> bool:
        return self.cosine >= self.min_cosine and self.rel_diff <= self.max_rel_diff

    def to_json(self) -> dict:
        return {"segment": self.segment, "output": self.output, "cosine": self.cosine,
                "max_abs_diff": self.max_abs_diff, "rel_diff": self.rel_diff, "ok": self.ok}


@dataclass
class ShardReport:
    num_device: int
    split: TensorSplit
    dtype: str
    checks: list[ShardCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def thresholds(self) -> tuple[float, float]:
        return SHARD_THRESHOLDS[self.dtype]

    def to_json(self) -> dict:
        return {"passed": self.passed, "num_device": self.num_device, "dtype": self.dtype,
                "devices": [{"device": s.device, "q_heads": [s.q_heads.start, s.q_heads.stop],
                             "kv_heads": [s.kv_heads.start, s.kv_heads.stop],
                             "columns": [s.columns.start, s.columns.stop]} for s in self.split.shards],
                "checks": [c.to_json() for c in self.checks]}


def _linear(weight, bias):
    import torch
    from torch import nn

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def _rows(linear, index):
    """Column-parallel: the output features ``index`` (with their bias)."""
    return _linear(linear.weight[index], None if linear.bias is None else linear.bias[index])


def _columns(linear, index, with_bias: bool):
    """Row-parallel: the input features ``index``; the bias once, on the device that adds the residual."""
    return _linear(linear.weight[:, index], linear.bias if with_bias and linear.bias is not None else None)


def _head_index(heads: range, head_dim: int):
    import torch

    return torch.arange(heads.start * head_dim, heads.stop * head_dim)


def check_layer_shape(layer, family_name: str) -> None:
    """The split applies to a plain pre-norm layer with separate Q/K/V/O and gate/up/down projections."""
    children = {name for name, _ in layer.named_children()}
    missing = [f"self_attn.{p}" for p in ATTENTION_PROJECTIONS if not hasattr(getattr(layer, "self_attn", None), p)]
    missing += [f"mlp.{p}" for p in MLP_PROJECTIONS if not hasattr(getattr(layer, "mlp", None), p)]
    extra = sorted(children - LAYER_CHILDREN)
    if missing or extra or not LAYER_CHILDREN <= children:
        what = ", ".join([f"no {m}" for m in missing] + [f"extra {e}" for e in extra]) or "a different layout"
        raise UnsupportedModelError(
            f"the tensor-parallel split covers pre-norm layers with separate q/k/v/o and gate/up/down projections; "
            f"{family_name}'s decoder layer has {what}")


def shard_layer(layer, shard: DeviceShard, split: TensorSplit):
    """(attention half, MLP half) of ``layer`` for one device: copies of its modules with this device's weights."""
    import copy

    import torch

    attn = layer.self_attn
    head_dim = int(getattr(attn, "head_dim", attn.q_proj.out_features // split.num_heads))
    first = shard.device == 0
    part = copy.copy(attn)  # a shallow copy: the projections below replace the shared ones
    part._modules = dict(attn._modules)
    part.q_proj = _rows(attn.q_proj, _head_index(shard.q_heads, head_dim))
    part.k_proj = _rows(attn.k_proj, _head_index(shard.kv_heads, head_dim))
    part.v_proj = _rows(attn.v_proj, _head_index(shard.kv_heads, head_dim))
    part.o_proj = _columns(attn.o_proj, _head_index(shard.q_heads, head_dim), with_bias=first)
    part.num_key_value_groups = len(shard.q_heads) // len(shard.kv_heads)
    for name, value in (("num_heads", len(shard.q_heads)), ("num_attention_heads", len(shard.q_heads)),
                        ("num_key_value_heads", len(shard.kv_heads))):
        if isinstance(getattr(attn, name, None), int):  # older attention modules reshape by their own counts
            setattr(part, name, value)
    mlp = copy.copy(layer.mlp)
    mlp._modules = dict(layer.mlp._modules)
    cols = torch.arange(shard.columns.start, shard.columns.stop)
    mlp.gate_proj = _rows(layer.mlp.gate_proj, cols)
    mlp.up_proj = _rows(layer.mlp.up_proj, cols)
    mlp.down_proj = _columns(layer.mlp.down_proj, cols, with_bias=first)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(cols)
    attention_half, mlp_half = _half_classes()
    return attention_half(layer.input_layernorm, part, first), mlp_half(layer.post_attention_layernorm, mlp, first)


@functools.lru_cache(maxsize=None)
def _half_classes():
    from torch import nn

    from ..export.wrappers import _layer_cache_kwarg

    class AttentionHalf(nn.Module):
        """Looks like a decoder layer to the block wrappers (same call), computes this device's attention partial."""

        def __init__(self, norm, attn, residual: bool):
            super().__init__()
            self.norm, self.attn, self.residual = norm, attn, residual
            self.attn_cache_kwarg = _layer_cache_kwarg(attn)

        def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=True,
                    past_key_values=None, position_embeddings=None, **kwargs):
            out = self.attn(hidden_states=self.norm(hidden_states), attention_mask=attention_mask,
                            position_ids=position_ids, position_embeddings=position_embeddings, use_cache=True,
                            **{self.attn_cache_kwarg: past_key_values})
            out = out[0] if isinstance(out, tuple) else out
            return out + hidden_states if self.residual else out

    class MlpHalf(nn.Module):
        def __init__(self, norm, mlp, residual: bool):
            super().__init__()
            self.norm, self.mlp, self.residual = norm, mlp, residual

        def forward(self, hidden_states):
            out = self.mlp(self.norm(hidden_states))
            return out + hidden_states if self.residual else out

    return AttentionHalf, MlpHalf


def block_inputs(entry: SegmentEntry, seq: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Inputs of a block or decode block in the contract's order: random states and history, a causal prompt or a
    decode step in the middle of the window."""
    arrays = []
    step = seq // 2  # the decode step's position: history slots before it valid, after it masked
    for t in entry.inputs:
        if t.dtype.startswith("int"):  # position_ids
            values = np.arange(t.shape[-1]) if entry.kind == SegmentKind.BLOCK else np.full(t.shape[-1], step)
            arrays.append(values.reshape(t.shape).astype(t.dtype))
        elif t.name == "attention_mask":
            if entry.kind == SegmentKind.BLOCK:
                mask = np.triu(np.full(t.shape[-2:], MASK_VALUE, np.float32), 1)
            else:
                mask = np.zeros(t.shape[-2:], np.float32)
                mask[:, step:-1] = MASK_VALUE
            arrays.append(mask.reshape(t.shape))
        else:
            arrays.append(rng.standard_normal(t.shape).astype(np.float32))
    return arrays


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(path: Path, arrays: list[np.ndarray]) -> list[np.ndarray]:
    session = _session(path)
    return session.run(None, {i.name: a for i, a in zip(session.get_inputs(), arrays)})


def _export(module, arrays: list[np.ndarray], names: list[str], outputs: list[str], path: Path) -> Path:
    import torch

    from ..export.exporter import _EXPORT_LOCK, DEFAULT_OPSET

    args = tuple(torch.from_numpy(a) for a in arrays)
    with _EXPORT_LOCK, torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=names, output_names=outputs,
                          opset_version=DEFAULT_OPSET, do_constant_folding=True, dynamo=False)
    return path


def _compare(segment: str, output: str, whole: np.ndarray, sharded: np.ndarray, thresholds) -> ShardCheck:
    a, b = whole.astype(np.float64).ravel(), sharded.astype(np.float64).ravel()
    if a.shape != b.shape:
        raise VerificationError(f"{segment}: the shards' {output} has {b.size} values, the block's {a.size}")
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    diff = float(np.abs(a - b).max())
    return ShardCheck(segment, output, cosine, diff, diff / (float(np.abs(a).max()) + 1e-30), *thresholds)


def _source_parts(out_dir: Path, manifest: Manifest, model_path: str | None):
    from ..export.model_parts import ModelParts
    from ..source.checkpoint import load_config, open_weights, resolve_model
    from .verify import _source_folder

    source = resolve_model(str(_source_folder(manifest, model_path)))
    config, family = load_config(source, trust_remote_code=False)
    return ModelParts(config, family, open_weights(source, config), manifest.options.dtype)


def verify_shards(out_dir: str | Path, num_device: int, model_path: str | None = None, seed: int = 0,
                  layers: list[int] | None = None) -> ShardReport:
    """Cut OUT's blocks (prefill and decode) over ``num_device`` devices, run the shards in onnxruntime, reduce
    them, and compare hidden states and KV caches with the whole block graphs of OUT. ``layers``: only these."""
    from ..export.exporter import _with_float_boundary
    from ..export.family_layers import adapt_layer
    from ..export.wrappers import BlockCacheSegment, BlockSegment

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if not manifest.complete:
        raise VerificationError(f"'{out_dir}' is an unfinished export (manifest marked incomplete); rerun the export")
    if num_device < 2:
        raise UsageError(f"must be 2 or more for the shard proof (got {num_device})", option="num_device")
    m = manifest.model
    split = tensor_split(m.num_heads, m.num_kv_heads, num_device)  # the one-line refusal, before loading anything
    parts = _source_parts(out_dir, manifest, model_path)
    fam, seq, dtype = parts.family, int(manifest.options.seq_length), manifest.options.dtype
    if fam.state_layers(parts.text_config) or fam.per_layer_embedding is not None:
        raise UnsupportedModelError(f"the tensor-parallel split covers attention layers with a KV cache only; "
                                    f"{fam.name} has recurrent-state or per-layer-input layers")
    report = ShardReport(num_device, split, dtype)
    thresholds = SHARD_THRESHOLDS[dtype]
    rng = np.random.default_rng(seed)
    entries = [e for e in manifest.segments if e.kind in SHARDED_KINDS and (layers is None or e.layer in layers)]
    if not entries:
        raise UsageError(f"'{out_dir}' has no block segments to split")
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tpugraph-shards-") as tmp:
        for entry in entries:
            arrays = block_inputs(entry, seq, rng)
            whole = _run(out_dir / entry.file, arrays)
            rotary = parts.rotary_table(seq, entry.layer)
            window = parts.sliding_window(entry.layer)
            window = None if window is not None and seq <= window else window
            wrapper = BlockSegment if entry.kind == SegmentKind.BLOCK else BlockCacheSegment
            names = [t.name for t in entry.inputs]
            with parts.materialized(f"{fam.layers_path}.{entry.layer}") as layer:
                adapt_layer(fam.layer_rewrites, layer, parts.text_config)
                check_layer_shape(layer, fam.name)
                split = tensor_split(m.num_heads, m.num_kv_heads, num_device, layer.mlp.gate_proj.out_features)
                report.split = split
                attn_out, keys, values = [], {}, {}
                for shard in split.shards:
                    attn, mlp = shard_layer(layer, shard, split)
                    dev_arrays = list(arrays)
                    if entry.kind == SegmentKind.BLOCK_CACHE:  # this device's heads of the history
                        for i in (3, 4):
                            dev_arrays[i] = np.ascontiguousarray(
                                arrays[i][:, :, shard.kv_heads.start:shard.kv_heads.stop])
                    half = _with_float_boundary(wrapper(attn, rotary, window), parts)
                    path = _export(half, dev_arrays, names, ["partial", "past_k", "past_v"],
                                   Path(tmp) / f"{entry.name}_dev{shard.device}_attention.onnx")
                    partial, keys[shard.device], values[shard.device] = _run(path, dev_arrays)
                    attn_out.append((partial, mlp))
                hidden = np.sum([p for p, _ in attn_out], axis=0, dtype=np.float32)  # the first all-reduce
                mlp_out = []
                for shard, (_, mlp) in zip(split.shards, attn_out):
                    path = _export(_with_float_boundary(mlp, parts), [hidden], ["hidden_states"], ["partial"],
                                   Path(tmp) / f"{entry.name}_dev{shard.device}_mlp.onnx")
                    mlp_out.append(_run(path, [hidden])[0])
            result = np.sum(mlp_out, axis=0, dtype=np.float32)  # the second all-reduce
            owners = split.kv_owners
            report.checks.append(_compare(entry.name, "hidden_states", whole[0], result, thresholds))
            report.checks.append(_compare(entry.name, "past_k", whole[1],
                                          np.concatenate([keys[d] for d in owners], axis=2), thresholds))
            report.checks.append(_compare(entry.name, "past_v", whole[2],
                                          np.concatenate([values[d] for d in owners], axis=2), thresholds))
            for d, shard in enumerate(split.shards):  # a copied KV head: every copy equals its owner's
                owner = owners[shard.kv_heads.start] if split.kv_copies > 1 else d
                if owner != d:
                    report.checks.append(_compare(entry.name, f"past_k (device {d}, copy of {owner})",
                                                  keys[owner], keys[d], thresholds))
            log.info("%s over %d devices: %s", entry.name, num_device,
                     ", ".join(f"{c.output} cos {c.cosine:.7f}" for c in report.checks[-3:]))
    return report
