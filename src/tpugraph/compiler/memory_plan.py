"""A model's weight shapes + chip, mode and device count -> the bytes each device holds, and whether they fit.

Counted before any tool runs, from the model's config (its weights' shapes on the meta device, no weight read):

- weights per net group (embedding, blocks, lm_head, vit), in the compile's types: the embedding, norms, biases
  and the vit in the mode's float type (2 bytes); matmul weights (the blocks' linears, lm_head) in the mode, as
  weight_cost.WeightCost counts them (tpu-mlir's layout: 1 byte (w8) / half a byte (w4) per element plus, per
  group of a row, a 2-byte scale and a 1-byte zero point). A tied vocabulary matrix shared by embedding and lm_head
  (one device, compile's default) is counted once, in the embedding.
- KV cache: SEQ x the layers' (kv heads x head dim) x 2 (K and V) x 2 bytes.
- activations: an estimate of the largest net's working set (the prefill block at L tokens, lm_head's logits).

With N devices, the split tpu-mlir's device-parallel pass makes of llm_convert's nets (--num_device N,
lib/Dialect/Tpu/Transforms/DevParallel*.cpp): in every layer the attention by heads (q and o projections by
attention heads, k and v projections and the KV cache by KV heads, ceil(heads / N) per device) and the MLP by
columns (gate/up rows and down columns, ceil(intermediate / N) per device); lm_head by vocabulary rows
(ceil(vocab / N), its greedy TopK merged across devices); the embedding (its Gather pattern is disabled), norms
and the vit are whole on every device, and a tied matrix is no longer shared. A pattern splits only a net whose
largest matmul has more than WEIGHT_LIMIT elements: smaller nets are copied whole to every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from .chips import GIB, ChipSpec, chip_spec
from .weight_cost import FLOAT_BYTES, WeightCost

WEIGHT_LIMIT = 0x400000  # DevParallel.cpp: "only >= 4MB distribute to multi devices" (elements of the weight)
GROUPS = ("embedding", "blocks", "lm_head", "vit", "other")
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn")
_OUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "o", "wo")  # attention's output projection: split by its input
_DOWN_PROJECTIONS = ("down_proj", "w2", "fc2", "down")


@dataclass(frozen=True)
class WeightShape:
    """One weight of the model and how a device split treats it."""

    name: str
    group: str  # GROUPS
    shape: tuple[int, ...]
    matmul: bool = False  # a linear's weight [out, in]: the mode's weight-only quantization applies
    split_axis: int | None = None  # the axis the device split cuts (0: out rows, 1: in columns), None: whole
    units: int = 1  # indivisible units along that axis (heads, columns, vocabulary rows)
    pattern: str = ""  # the net part a device-parallel pattern splits as one (layer 3 attention, lm_head...)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs of a model: its weights and its KV cache per layer."""

    model_type: str
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    kv_layers: tuple[tuple[int, int], ...]  # (kv heads, head dim) of each layer with its own KV cache
    weights: tuple[WeightShape, ...]

    @classmethod
    def from_config(cls, config, family=None) -> "ModelShape":
        """The shapes of a transformers config's model, built on the meta device (no weight is read or made)."""
        from ..export.model_parts import _build_skeleton
        from ..source.families import family_for

        family = family or family_for(getattr(config, "model_type", None), list(getattr(config, "architectures", None) or []))
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        skeleton = _build_skeleton(config, family.auto_class)
        hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
        kv = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        inter = int(getattr(text, "intermediate_size", 0) or 0)
        weights = classify(skeleton.named_parameters(), family, hidden, heads, kv, head_dim, inter)
        layers = int(text.num_hidden_layers)
        return cls(model_type=str(text.model_type), hidden_size=hidden, num_heads=heads, intermediate_size=inter,
                   vocab_size=int(text.vocab_size), tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   kv_layers=tuple((kv, head_dim) for _ in range(layers)), weights=tuple(weights))


def _role(name: str, shape: tuple[int, ...], hidden: int, heads: int, kv: int, head_dim: int,
          inter: int) -> tuple[int | None, int, str]:
    """(split axis, units, part) of a decoder layer's linear weight [out, in] under llm_convert's device split."""
    out, inp = shape
    path = name.lower()
    leaf = path.rpartition(".")[2]
    if any(w in path for w in _ATTENTION_WORDS):
        if leaf in _OUT_PROJECTIONS and out == hidden and inp == heads * head_dim:
            return 1, heads, "attention"  # o (square when heads x head dim = hidden: told by its name)
        if inp == hidden and out == heads * head_dim:
            return 0, heads, "attention"  # q
        if inp == hidden and out == kv * head_dim:
            return 0, kv, "attention"  # k, v
        if inp == hidden and out == (heads + 2 * kv) * head_dim:
            return 0, heads + 2 * kv, "attention"  # fused qkv (heads of the three)
        if out == hidden and inp == heads * head_dim:
            return 1, heads, "attention"  # o
    if any(w in path for w in _MLP_WORDS) and inter:
        if leaf in _DOWN_PROJECTIONS and out == hidden and inp == inter:
            return 1, inp, "mlp"
        if inp == hidden and out in (inter, 2 * inter):
            return 0, out, "mlp"  # gate, up (or fused gate_up)
        if out == hidden and inp == inter:
            return 1, inp, "mlp"  # down
    return None, 1, ""


def classify(named_parameters, family, hidden: int, heads: int, kv: int, head_dim: int,
             inter: int) -> list[WeightShape]:
    """The model's parameters as WeightShapes: their net group and how a device split cuts them."""
    layers = family.layers_path + "."
    weights: list[WeightShape] = []
    linear_rule: dict[str, tuple[int | None, int, str]] = {}  # module -> its weight's split (its bias follows)
    for name, param in named_parameters:
        shape = tuple(int(d) for d in param.shape)
        module, _, leaf = name.rpartition(".")
        if name.startswith(family.embed_path + "."):
            weights.append(WeightShape(name, "embedding", shape))
        elif name.startswith(family.lm_head_path + "."):
            matmul = len(shape) == 2
            weights.append(WeightShape(name, "lm_head", shape, matmul=matmul, split_axis=0, units=shape[0],
                                       pattern="lm_head"))
        elif name.startswith(family.norm_path + "."):
            weights.append(WeightShape(name, "lm_head", shape))  # the final norm: lm_head's net with N > 1
        elif name.startswith(layers):
            layer = name[len(layers):].split(".", 1)[0]
            if len(shape) == 2 and leaf == "weight":
                axis, units, part = _role(module, shape, hidden, heads, kv, head_dim, inter)
                linear_rule[module] = (axis, units, part)
                weights.append(WeightShape(name, "blocks", shape, matmul=True, split_axis=axis, units=units,
                                           pattern=f"layer {layer} {part}" if part else ""))
            elif len(shape) == 1 and leaf == "bias" and linear_rule.get(module, (None,))[0] == 0:
                axis, units, part = linear_rule[module]  # an out-split linear's bias is cut with its rows
                weights.append(WeightShape(name, "blocks", shape, split_axis=0, units=units,
                                           pattern=f"layer {layer} {part}"))
            else:
                weights.append(WeightShape(name, "blocks", shape))
        elif any(w in name for w in ("visual", "vision")):
            weights.append(WeightShape(name, "vit", shape))
        else:
            weights.append(WeightShape(name, "other", shape))
    return weights


@dataclass
class MemoryPlan:
    """The bytes one device holds (the largest share, device 0), by part, and whether they fit the chip."""

    chip: ChipSpec
    quantize: str
    num_device: int
    seq_length: int
    input_length: int
    memory_bytes: int  # what the device has for the model (the chip's, or --device-memory)
    weights: dict[str, int]  # per device, by group (GROUPS)
    kv_cache: int
    activations: int
    split: list[str] = field(default_factory=list)  # net parts split across devices
    whole: list[str] = field(default_factory=list)  # net parts below the split threshold: whole on each device
    vocab_shared: bool = False

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.memory_bytes

    def summary(self) -> str:
        """One line: the total per device against the memory."""
        per = "per device" if self.num_device > 1 else "on the device"
        return (f"{_gib(self.total)} {per} ({_gib(self.weight_bytes)} weights, {_gib(self.kv_cache)} KV cache, "
                f"{_gib(self.activations)} activations) of {_gib(self.memory_bytes)} on {self.chip.name}")

    def lines(self) -> list[str]:
        head = (f"memory plan: {self.quantize} on {self.chip.name}, SEQ {self.seq_length}, {self.num_device} device"
                + ("s (split as llm_convert --num_device splits it)" if self.num_device > 1 else ""))
        rows = [head, f"  {'':<22}{'per device':>14}{'all devices':>14}"]

        def row(label: str, value: int) -> str:
            return f"  {label:<22}{_gib(value):>14}{_gib(value * self.num_device):>14}"

        for group in GROUPS:
            if self.weights.get(group):
                note = " (shares embedding)" if group == "lm_head" and self.vocab_shared else ""
                rows.append(row(f"weights {group}", self.weights[group]) + note)
        if self.vocab_shared and not self.weights.get("lm_head"):
            rows.append(f"  {'weights lm_head':<22}{'(the embedding matrix, stored once)':>28}")
        rows.append(row("KV cache", self.kv_cache))
        rows.append(row("activations (est.)", self.activations))
        rows.append(row("total", self.total))
        verdict = "fits" if self.fits else "DOES NOT FIT"
        rows.append(f"  device memory {_gib(self.memory_bytes)}: {verdict}")
        if self.num_device > 1 and self.whole:
            rows.append(f"  whole on every device (largest matmul <= {WEIGHT_LIMIT} elements): "
                        + _shorten(self.whole))
        return rows

    def to_json(self) -> dict:
        return {"chip": self.chip.name, "quantize": self.quantize, "num_device": self.num_device,
                "seq_length": self.seq_length, "input_length": self.input_length, "weights": dict(self.weights),
                "kv_cache": self.kv_cache, "activations": self.activations, "total": self.total,
                "memory_bytes": self.memory_bytes, "fits": self.fits, "vocab_shared": self.vocab_shared,
                "split": list(self.split), "whole": list(self.whole)}


def _gib(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _shorten(parts: list[str], keep: int = 4) -> str:
    return ", ".join(parts[:keep]) + (f" and {len(parts) - keep} more" if len(parts) > keep else "")


def plan_memory(shape: ModelShape, chip: str | ChipSpec, quantize: str, num_device: int, seq_length: int,
                input_length: int | None = None, q_group_size: int | None = None, q_symmetric: bool = False,
                share_vocab: bool = True, memory_bytes: int | None = None) -> MemoryPlan:
    """The per-device bytes of ``shape`` compiled in ``quantize`` for ``chip`` over ``num_device`` devices.
    ``q_symmetric`` costs the same: tpu-mlir keeps a zero point per group either way (weight_cost.py)."""
    spec = chip if isinstance(chip, ChipSpec) else chip_spec(chip)
    quantize = quantize.lower()
    if num_device < 1:
        raise UsageError(f"the device count must be positive (got {num_device})")
    length = input_length or seq_length
    # a pattern splits when its largest matmul is big enough (DevParallel.cpp isLargeMatMul)
    largest: dict[str, int] = {}
    for w in shape.weights:
        if w.pattern and w.matmul:
            largest[w.pattern] = max(largest.get(w.pattern, 0), w.elements)
    split = {p for p, n in largest.items() if num_device > 1 and n > WEIGHT_LIMIT}
    whole = [p for p in largest if p not in split] if num_device > 1 else []
    shared = share_vocab and num_device == 1 and shape.tie_word_embeddings
    weights = {g: 0 for g in GROUPS}
    for w in shape.weights:
        rows = w.shape[0] if w.shape else 1
        cols = w.elements // rows if rows else 0
        if w.pattern in split and w.split_axis is not None:  # ceil(units / N) whole units (heads, rows) each
            kept = math.ceil(w.units / num_device)
            if w.split_axis == 0:
                rows = rows // w.units * kept
            else:
                cols = cols // w.units * kept
        if w.group == "lm_head" and w.matmul and shared:
            continue  # the embedding's matrix, stored once
        if w.matmul and w.group in ("blocks", "lm_head"):
            weights[w.group] += WeightCost(quantize, q_group_size).bytes(rows, cols)
        else:
            weights[w.group] += rows * cols * FLOAT_BYTES
    attention_split = any(p.endswith(" attention") for p in split)
    kv_per_layer = [(math.ceil(k / num_device) if attention_split else k) * d for k, d in shape.kv_layers]
    kv_cache = seq_length * sum(kv_per_layer) * 2 * FLOAT_BYTES
    heads = math.ceil(shape.num_heads / num_device) if attention_split else shape.num_heads
    mlp_split = any(p.endswith(" mlp") for p in split)
    inter = math.ceil(shape.intermediate_size / num_device) if mlp_split else shape.intermediate_size
    head_dim = shape.kv_layers[0][1] if shape.kv_layers else shape.hidden_size // max(1, shape.num_heads)
    kv_width = max(kv_per_layer, default=0)
    vocab = math.ceil(shape.vocab_size / num_device) if "lm_head" in split else shape.vocab_size
    # the prefill block at L tokens: in/out states, q/k/v, attention scores against SEQ, the MLP's two
    # intermediates; then lm_head's float32 logits
    activations = FLOAT_BYTES * length * (2 * shape.hidden_size + heads * head_dim + 2 * kv_width
                                          + heads * seq_length + 2 * inter) + 4 * vocab
    return MemoryPlan(chip=spec, quantize=quantize, num_device=num_device, seq_length=seq_length,
                      input_length=length, memory_bytes=memory_bytes or spec.memory_bytes,
                      weights={g: b for g, b in weights.items() if b or g in ("embedding", "blocks", "lm_head")},
                      kv_cache=kv_cache, activations=activations, split=sorted(split, key=_part_order),
                      whole=sorted(whole, key=_part_order), vocab_shared=shared)


def _part_order(part: str):
    words = part.split()
    return (0, int(words[1]), words[2]) if words[0] == "layer" else (1, 0, part)


def shape_of_output(out_dir: Path, manifest) -> ModelShape:
    """The ModelShape of an output's source model (its config, read again; the weights are not opened). For
    layers whose KV differs (manifest.model.layers_kv: per-layer shapes, shared KV), the manifest's."""
    from ..source.checkpoint import load_config, materialize_preset, resolve_model

    record = manifest.model.source
    try:
        source = resolve_model(record.path)
    except Exception:
        if not record.preset:
            raise UsageError(f"the memory plan needs the source model's config: {record.path} is gone") from None
        source = resolve_model(str(materialize_preset(record.preset)))
    config, family = load_config(source)
    shape = ModelShape.from_config(config, family)
    if manifest.model.layers_kv:
        kv = tuple((r.kv_heads, r.head_dim) for r in manifest.model.layers_kv if r.kv_from is None)
        shape = ModelShape(**{**shape.__dict__, "kv_layers": kv})
    elif manifest.model.state_layers:
        states = set(manifest.model.state_layers)
        kv = tuple(k for i, k in enumerate(shape.kv_layers) if i not in states)
        shape = ModelShape(**{**shape.__dict__, "kv_layers": kv})
    return shape


def plan_output_memory(out_dir: Path, manifest, options) -> MemoryPlan:
    """The memory plan of compiling an output with (resolved, checked) CompileOptions."""
    from .plan import DEFAULT_Q_GROUP_SIZE

    shape = shape_of_output(out_dir, manifest)
    group = options.q_group_size or (DEFAULT_Q_GROUP_SIZE if options.quantize.startswith("w4") else None)
    disk = manifest.conventions.embedding_disk is not None  # the host gathers the rows: no embedding net
    plan = plan_memory(shape, options.chip, options.quantize, options.num_device, int(manifest.options.seq_length),
                       manifest.options.input_length, group, options.q_symmetric, options.share_vocab and not disk,
                       options.device_memory)
    if disk:
        plan.weights["embedding"] = 0
    return plan


def output_memory_or_none(out_dir: Path, manifest, options) -> tuple[MemoryPlan | None, str]:
    """plan_output_memory, or None and why when the source's config cannot be read or its shapes cannot be built
    (the compile goes on: the plan is a check before the tools, not a step of the compile)."""
    from ..errors import TpugraphError

    try:
        return plan_output_memory(out_dir, manifest, options), ""
    except TpugraphError as err:
        return None, str(err)
    except Exception as exc:  # transformers cannot build this model's skeleton from its config
        return None, f"the model's shapes could not be built ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def check_fits(plan: MemoryPlan) -> None:
    """Refuse a compile whose model the plan puts above the device's memory, with the numbers."""
    if not plan.fits:
        more = (" or more devices (--num-device)" if plan.chip.max_devices > plan.num_device else "")
        raise UsageError(f"the model does not fit {plan.chip.name}: {plan.summary()}; use a smaller mode (--quantize)"
                         f"{more}, or give the board's real memory with --device-memory GIB")
