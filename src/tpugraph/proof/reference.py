"""transformers' own model as the float32 reference of verify: whole, or with its decoder layers' weights
streamed from the safetensors when the whole fp32 model would not fit in memory.

Streamed, the model is the same transformers model running the same ``generate``: its parameters start on
the meta device, the embedding, final norm and lm_head are loaded once, and each decoder layer gets its
weights (cast to float32) just before its forward and gives them back just after. A 7B model then needs
about 2.5 GB instead of 28 GB, at the cost of reading every layer once per generated token.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from ..errors import UnsupportedModelError
from ..source.checkpoint import (
    is_gguf_file,
    load_config,
    open_weights,
    quantization_config,
    quiet_transformers,
    read_config_json,
    resolve_model,
)
from ..source.families import family_for
from ..source.weights import WeightStore

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.5  # stream when the fp32 model is over this share of the memory available


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), or the physical memory where that is missing."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def float32_bytes(weights: WeightStore) -> int:
    return sum(math.prod(weights.shape_and_dtype(k)[0]) * 4 for k in weights.keys())


def _weights(model_dir: Path):
    """The source's weights as tpugraph reads them (plain, dequantized packed layers, or a .gguf file)."""
    source = resolve_model(str(model_dir))
    if source.gguf_file is None and quantization_config(source) is None:
        return WeightStore(source.path)
    config, _ = load_config(source)
    return open_weights(source, config)


def should_stream(model_dir: Path) -> bool:
    need, have = float32_bytes(_weights(model_dir)), available_memory()
    stream = need > MEMORY_SHARE * have
    if stream:
        log.info("the fp32 reference needs %.1f GB, %.1f GB available: its layers' weights are streamed",
                 need / 1e9, have / 1e9)
    return stream


def load_full(model_dir: Path):
    """transformers' own from_pretrained in float32. A .gguf file is loaded by transformers' GGUF loader
    (dequantized by transformers). A GPTQ/AWQ folder, which transformers loads only with GPU kernels, is
    the streamed model with tpugraph's dequantized weights (for an independent reference, pass a float
    checkpoint to ``verify --model``)."""
    import torch
    import transformers

    quiet_transformers()
    model_dir = Path(model_dir)
    kwargs: dict = {"attn_implementation": "eager"}
    auto = transformers.AutoModelForCausalLM
    if is_gguf_file(model_dir):
        model_dir, kwargs["gguf_file"] = model_dir.parent, model_dir.name
    elif quantization_config(resolve_model(str(model_dir))) is not None:
        log.info("%s is a quantized checkpoint: the reference runs transformers' modules on its dequantized weights",
                 model_dir)
        return load_streamed(model_dir)
    else:  # the family's own auto class (a vision-language model is no causal LM to transformers' mapping)
        raw = read_config_json(model_dir)
        try:
            auto = getattr(transformers, family_for(raw.get("model_type"), raw.get("architectures") or []).auto_class)
        except UnsupportedModelError:
            pass
    try:
        model = auto.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = auto.from_pretrained(str(model_dir), torch_dtype=torch.float32, **kwargs)
    return model.eval()


def with_adapter(model, adapter_dir: Path):
    """transformers' model with a PEFT LoRA adapter loaded on it (not merged: PEFT's own forward, the reference a
    merged export or the LoRA inputs are compared with)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def reference_adapter(manifest, lora: str | Path | None):
    """The LoRA adapter (source/lora.LoraAdapter) the reference loads and the runtime feeds, or None: ``lora`` (read
    and checked), else the one merged into OUT. UsageError for an adapter OUT cannot take."""
    from ..errors import UsageError
    from ..source.lora import read_adapter

    record = manifest.model.lora
    if record is None:
        if lora is not None:
            raise UsageError("OUT has no LoRA adapter merged and no LoRA inputs: export with --lora ADAPTER_DIR "
                             "(merged) or --lora-max-rank R (inputs)", option="lora")
        return None
    if record.mode == "merged":
        adapter = read_adapter(lora if lora is not None else record.path)
        if adapter.sha256 != record.sha256:
            raise UsageError(f"OUT has the adapter {record.path} merged (sha256 {record.sha256[:12]}); "
                             f"'{adapter.path}' is another one (sha256 {adapter.sha256[:12]})", option="lora")
        return adapter
    return read_adapter(lora) if lora is not None else None


def load_streamed(model_dir: Path):
    """The model with only its non-layer weights in memory; layers load theirs around their forward."""
    import torch
    from torch import nn

    from ..export.model_parts import ModelParts

    quiet_transformers()
    source = resolve_model(str(model_dir))
    config, family = load_config(source, trust_remote_code=False)
    weights = open_weights(source, config)
    parts = ModelParts(config, family, weights, "float32")
    model = parts.skeleton
    layers_prefix = f"{family.layers_path}."

    def fp32(key: str) -> nn.Parameter:
        return nn.Parameter(weights.get(key).to(torch.float32), requires_grad=False)

    # Everything outside the decoder layers, for good (a tied head shares the embedding's tensor).
    loaded: dict[str, nn.Parameter] = {}
    for name, _ in list(model.named_parameters(remove_duplicate=False)):
        if name.startswith(layers_prefix):
            continue
        owner_name, _, leaf = name.rpartition(".")
        key = parts.checkpoint_key(owner_name, leaf)
        if key not in loaded:
            loaded[key] = fp32(key)
        setattr(model.get_submodule(owner_name), leaf, loaded[key])

    layers = model.get_submodule(family.layers_path)
    for index, layer in enumerate(layers):
        path = f"{family.layers_path}.{index}"
        names = [name for name, _ in layer.named_parameters(remove_duplicate=False)]
        keys = {name: parts.checkpoint_key(f"{path}.{name.rpartition('.')[0]}".rstrip("."), name.rpartition(".")[2])
                for name in names}
        layers[index] = _streamed_layer_class()(layer, lambda keys=keys: {n: fp32(k) for n, k in keys.items()})
    return model.eval()


def _streamed_layer_class():
    from torch import nn
    from torch.func import functional_call

    class _StreamedLayer(nn.Module):
        """A decoder layer whose weights are read just for its forward (``functional_call``): the layer
        itself keeps its meta parameters, nothing is swapped in or out of it."""

        def __init__(self, layer: nn.Module, read_weights):
            super().__init__()
            self._layer = [layer]  # not a submodule: its meta parameters are not the model's
            self._read_weights = read_weights

        def forward(self, *args, **kwargs):
            return functional_call(self._layer[0], self._read_weights(), args, kwargs, strict=False)

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._layer[0], name)  # attributes transformers reads (attention_type...)

    return _StreamedLayer
