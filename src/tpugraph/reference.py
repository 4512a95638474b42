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

from .model_source import (
    WeightStore,
    is_gguf_file,
    load_config,
    open_weights,
    quantization_config,
    quiet_transformers,
    resolve_model,
)

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
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model_dir = Path(model_dir)
    kwargs: dict = {"attn_implementation": "eager"}
    if is_gguf_file(model_dir):
        model_dir, kwargs["gguf_file"] = model_dir.parent, model_dir.name
    elif quantization_config(resolve_model(str(model_dir))) is not None:
        log.info("%s is a quantized checkpoint: the reference runs transformers' modules on its dequantized weights",
                 model_dir)
        return load_streamed(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32, **kwargs)
    return model.eval()


def load_streamed(model_dir: Path):
    """The model with only its non-layer weights in memory; layers load theirs around their forward."""
    import torch
    from torch import nn

    from .export.exporter import ModelParts

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
        model.get_submodule(owner_name)._parameters[leaf] = loaded[key]

    def load(layer: nn.Module, path: str) -> list:
        """Give the layer at ``path`` its weights; returns the meta parameters to put back."""
        saved = []
        for name, param in list(layer.named_parameters(remove_duplicate=False)):
            owner_name, _, leaf = name.rpartition(".")
            owner = layer.get_submodule(owner_name)
            saved.append((owner, leaf, param))
            owner._parameters[leaf] = fp32(parts.checkpoint_key(f"{path}.{owner_name}".rstrip("."), leaf))
        return saved

    def unload(saved: list) -> None:
        for owner, leaf, param in saved:
            owner._parameters[leaf] = param

    for index, layer in enumerate(model.get_submodule(family.layers_path)):
        state: dict[str, list] = {}
        path = f"{family.layers_path}.{index}"
        layer.register_forward_pre_hook(lambda m, args, path=path, state=state: state.__setitem__("saved", load(m, path)))
        layer.register_forward_hook(lambda m, args, out, state=state: unload(state.pop("saved")))
    return model.eval()
