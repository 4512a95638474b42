"""A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) -> its checked low-rank updates,
merged into a weight store (W + scale * B @ A per targeted linear) or handed to the runtime as padded inputs.

What is refused, one line each: DoRA, biases trained by the adapter, embedding targets, alpha patterns,
fan_in_fan_out layers, any other PEFT method or LoRA variant changing the forward; a target or a
``modules_to_save`` weight the model does not have, or of another shape (an adapter of another base model).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..contract.manifest_records import LoraRecord
from ..errors import ModelError, UnsupportedModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # the keys PeftModel.save_pretrained writes: its wrapper's path, then the model's

# adapter_config.json keys that change the forward beyond W + scale * B @ A when set (truthy): refused.
UNSUPPORTED_SETTINGS = {
    "use_dora": "DoRA (use_dora) adapters",
    "lora_bias": "adapters with a trained LoRA bias (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "alpha_pattern": "per-module lora_alpha (alpha_pattern)",
    "target_parameters": "adapters on parameters (target_parameters)",
    "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer replication",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}


@dataclass(frozen=True)
class LoraUpdate:
    """One targeted linear: ``module`` (its path in the model), A [r, in], B [out, r] and scale."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        """scale * B @ A in float32: what the adapter adds to the weight [out, in]."""
        return (self.b.to(torch.float32) * self.scale) @ self.a.to(torch.float32)


@dataclass
class LoraAdapter:
    path: Path
    sha256: str
    rank: int  # the largest rank of its updates
    alpha: float
    rslora: bool
    updates: dict[str, LoraUpdate]  # the base weight key -> its update
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: base key -> new weight

    @property
    def targets(self) -> list[str]:
        """The targeted linears by their name inside a block (q_proj, down_proj...), sorted."""
        return sorted({u.module.rsplit(".", 1)[-1] for u in self.updates.values()})

    def record(self, mode: str, max_rank: int | None = None) -> LoraRecord:
        return LoraRecord(mode=mode, path=str(self.path), sha256=self.sha256, rank=self.rank, alpha=self.alpha,
                          rslora=self.rslora, targets=self.targets, modules=len(self.updates),
                          modules_to_save=sorted(self.replaced) or None, max_rank=max_rank)

    def check_base(self, weights) -> None:
        """ModelError unless every weight the adapter changes exists in ``weights`` with the adapter's shapes."""
        for key, update in self.updates.items():
            if key not in weights:
                raise ModelError(f"LoRA adapter '{self.path}' targets '{update.module}', which the model does not "
                                 "have (an adapter of another model?)")
            shape = tuple(weights.shape_and_dtype(key)[0])
            want = (int(update.b.shape[0]), int(update.a.shape[1]))
            if shape != want:
                raise ModelError(f"LoRA adapter '{self.path}' does not fit the model: '{update.module}' is "
                                 f"{list(shape)} in the model, {list(want)} in the adapter (an adapter of another "
                                 "base model?)")
        for key, tensor in self.replaced.items():
            if key not in weights:
                raise UnsupportedModelError(f"LoRA adapter '{self.path}': modules_to_save weight '{key}' is not a "
                                            "weight of the model's checkpoint (a tied lm_head?); not supported")
            shape = tuple(weights.shape_and_dtype(key)[0])
            if shape != tuple(tensor.shape):
                raise ModelError(f"LoRA adapter '{self.path}' does not fit the model: '{key}' is {list(shape)} in "
                                 f"the model, {list(tensor.shape)} in the adapter (an adapter of another base model?)")

    def merged_into(self, weights) -> "LoraMergedWeights":
        self.check_base(weights)
        return LoraMergedWeights(weights, self)


class LoraMergedWeights:
    """A weight store with an adapter merged in: each targeted weight read as W + scale * B @ A (float32), each
    modules_to_save weight as the adapter's; every other key passes through unchanged."""

    def __init__(self, store, adapter: LoraAdapter):
        self.store = store
        self.adapter = adapter
        self.quantization = getattr(store, "quantization", None)

    def keys(self) -> list[str]:
        return self.store.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.store

    def get(self, key: str):
        if key in self.adapter.replaced:
            return self.adapter.replaced[key]
        update = self.adapter.updates.get(key)
        if update is None:
            return self.store.get(key)
        return self.store.get(key).to(torch.float32) + update.delta()

    def shape_and_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        shape, dtype = self.store.shape_and_dtype(key)
        if key in self.adapter.updates:
            return shape, "F32"  # merged in float32 (the adapter's update would be lost in a 16-bit base)
        if key in self.adapter.replaced:
            return shape, {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(
                self.adapter.replaced[key].dtype, dtype)
        return shape, dtype


def _adapter_sha256(config_path: Path, weights_path: Path) -> str:
    """sha256 over the adapter's config and weights files (what the adapter is: its alpha as much as its A and B)."""
    h = hashlib.sha256()
    for path in (config_path, weights_path):
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_adapter(folder: str | Path) -> LoraAdapter:
    """The adapter of a PEFT LoRA folder, checked: ModelError (unreadable) or UnsupportedModelError (a variant
    this merge would not reproduce exactly), one line each."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelError(f"LoRA adapter '{folder}' is not a folder (a PEFT adapter: {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelError(f"LoRA adapter '{folder}' has no {path.name} (a PEFT adapter saved with save_pretrained; "
                             "adapter_model.bin is not read: save it as safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise ModelError(f"{config_path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_path} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModelError(f"'{folder}' is a {config.get('peft_type')} adapter; only LoRA adapters are supported")
    for key, what in UNSUPPORTED_SETTINGS.items():
        if config.get(key):
            raise UnsupportedModelError(f"LoRA adapter '{folder}': {what} are not supported")
    if config.get("bias", "none") != "none":
        raise UnsupportedModelError(f"LoRA adapter '{folder}': bias='{config['bias']}' (trained biases) is not "
                                    "supported; only bias='none'")
    try:
        r, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{config_path} lacks a valid r and lora_alpha") from None
    rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}

    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:
        raise ModelError(f"{weights_path} is unreadable or truncated: {exc}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if "lora_embedding_" in name:
            raise UnsupportedModelError(f"LoRA adapter '{folder}' targets an embedding ({name}); not supported")
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                pairs.setdefault(name[: -len(f".{part}.weight")], {})[part] = tensor
                break
        else:
            if "lora_" in name or "magnitude" in name:
                raise UnsupportedModelError(f"LoRA adapter '{folder}': tensor '{key}' is of a LoRA variant this "
                                            "merge does not reproduce")
            if not config.get("modules_to_save"):
                raise UnsupportedModelError(f"LoRA adapter '{folder}': tensor '{key}' is neither a LoRA A/B "
                                            "matrix nor a modules_to_save weight")
            replaced[name] = tensor
    if not pairs and not replaced:
        raise ModelError(f"LoRA adapter '{folder}' holds no LoRA weights")
    updates: dict[str, LoraUpdate] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ModelError(f"LoRA adapter '{folder}': '{module}' has {', '.join(pair)} but not both A and B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ModelError(f"LoRA adapter '{folder}': '{module}' has A {list(a.shape)} and B {list(b.shape)}, not "
                             "A [r, in] and B [out, r]")
        rank = int(a.shape[0])
        if rank != r and not rank_pattern:
            raise ModelError(f"LoRA adapter '{folder}': '{module}' is of rank {rank}, its config says r={r}")
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        updates[f"{module}.weight"] = LoraUpdate(module, a, b, scale)
    return LoraAdapter(path=folder.resolve(), sha256=_adapter_sha256(config_path, weights_path), alpha=alpha, rslora=rslora,
                       rank=max((u.rank for u in updates.values()), default=0), updates=updates, replaced=replaced)


# -- LoRA inputs (--lora-max-rank R) ---------------------------------------------------------------------------

def lora_dims(config, family, max_rank: int, layer_dims: dict) -> dict:
    """ContractDims fields of the LoRA inputs of rank ``max_rank``. UsageError for the model variants whose block
    nets differ from the plain ones (state layers, per-layer inputs or shared KV in ``layer_dims``, vision)."""
    from ..errors import UsageError

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if (family.state_layers(text) or family.vision is not None or family.mrope
            or any(layer_dims.get(k) for k in ("kv_from", "per_layer"))):
        raise UsageError(f"LoRA inputs are not supported for family {family.name} yet (blocks with state, "
                         "per-layer or shared-KV inputs, or a vision model): merge an adapter with --lora",
                         option="lora_max_rank")
    return {"lora_rank": max_rank, "lora_linears": lora_linears(config, family)}


def lora_inputs_record(dims: dict) -> LoraRecord | None:
    """The manifest's record of the LoRA inputs (model.lora, mode inputs); None without them."""
    if not dims:
        return None
    return LoraRecord(mode="inputs", max_rank=dims["lora_rank"], targets=[path for path, _, _ in dims["lora_linears"]])


def lora_linears(config, family) -> tuple[tuple[str, int, int], ...]:
    """(path inside a decoder layer, in features, out features) of each nn.Linear of the layers, in module order:
    the linears whose LoRA A and B the block nets take as inputs. UsageError for a model whose layers differ or
    hold weights other than linears and norms (fused MoE experts), which the inputs would not cover."""
    from torch import nn

    from ..errors import UsageError
    from .weights import meta_model

    layers = meta_model(config).get_submodule(family.layers_path)
    found = None
    for index, layer in enumerate(layers):
        linears = tuple((path, int(m.in_features), int(m.out_features)) for path, m in layer.named_modules()
                        if isinstance(m, nn.Linear))
        owned = {f"{path}.weight" for path, _, _ in linears}
        other = [name for name, p in layer.named_parameters() if p.dim() >= 2 and name not in owned]
        if other:
            raise UsageError(f"layer {index} holds weights that are not nn.Linear ({other[0]}): LoRA inputs cover "
                             "linear layers only", option="lora_max_rank")
        if found is not None and linears != found:
            raise UsageError(f"layer {index}'s linears differ from layer 0's: LoRA inputs need layers alike",
                             option="lora_max_rank")
        found = linears
    if not found:
        raise UsageError("the model's layers have no linear layer to take LoRA inputs", option="lora_max_rank")
    return found


def lora_input_arrays(adapter: LoraAdapter | None, layer_prefix: str, linears: tuple[str, ...], max_rank: int,
                      shapes: dict[str, tuple[int, ...]]) -> list:
    """The LoRA inputs of one block net, in its input order: per linear A [R, in] (the adapter's rows, then zero
    rows) and B [R, out] (scale * B transposed, then zero rows); zeros where the adapter does not target it, and
    everywhere without an adapter (the base model). ``shapes``: the net's input shapes by name."""
    import numpy as np

    arrays = []
    for path in linears:
        a = np.zeros(shapes[f"{path}.lora_A"], dtype=np.float32)
        b = np.zeros(shapes[f"{path}.lora_B"], dtype=np.float32)
        update = adapter.updates.get(f"{layer_prefix}{path}.weight") if adapter is not None else None
        if update is not None:
            a[: update.rank] = update.a.to(torch.float32).numpy()
            b[: update.rank] = (update.b.to(torch.float32) * update.scale).t().numpy()
        arrays += [a, b]
    return arrays


def check_fits_inputs(adapter: LoraAdapter, layers_path: str, linears: dict[str, tuple[int, int]],
                      max_rank: int, layers: int) -> None:
    """UsageError unless the runtime can feed ``adapter`` to LoRA inputs of rank ``max_rank`` over ``linears``
    (path inside a layer -> (in, out)): every update on a block linear, of rank <= R, of the linear's shape; no
    modules_to_save (a whole weight replaced is no low-rank input)."""
    from ..errors import UsageError

    if adapter.replaced:
        raise UsageError(f"LoRA adapter '{adapter.path}' replaces whole weights (modules_to_save: "
                         f"{', '.join(sorted(adapter.replaced))}); LoRA inputs take low-rank updates only: merge it "
                         "at export with --lora", option="lora")
    prefix = f"{layers_path}."
    for update in adapter.updates.values():
        layer, _, path = update.module[len(prefix):].partition(".") if update.module.startswith(prefix) else ("", "", "")
        if not layer.isdigit() or int(layer) >= layers or path not in linears:
            raise UsageError(f"LoRA adapter '{adapter.path}' targets '{update.module}', which has no LoRA inputs in "
                             "this output (block linears only): merge it at export with --lora", option="lora")
        if update.rank > max_rank:
            raise UsageError(f"LoRA adapter '{adapter.path}' is of rank {update.rank} at '{update.module}'; this "
                             f"output's LoRA inputs take rank <= {max_rank} (re-export with a larger "
                             "--lora-max-rank)", option="lora")
        want = (int(update.a.shape[1]), int(update.b.shape[0]))
        if linears[path] != want:
            raise UsageError(f"LoRA adapter '{adapter.path}' does not fit this output: '{update.module}' is "
                             f"in={linears[path][0]}, out={linears[path][1]} here, in={want[0]}, out={want[1]} in "
                             "the adapter (an adapter of another base model?)", option="lora")
