"""A model folder's safetensors, memory-mapped and read one tensor at a time; the model's module tree on the meta
device (its parameter names and shapes, no memory). The ground the other weight readers (GGUF, quantized) stand on."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError


class WeightStore:
    """Memory-mapped read access to a model folder's safetensors, one tensor at a time."""

    quantization = None  # plain weights: nothing for the manifest to record

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self._file_of: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ModelError(f"{index} is not a valid safetensors index: {exc}") from None
            self._file_of = dict(weight_map)
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise ModelError(f"model folder '{self.folder}' has no *.safetensors weights")
            for f in files:
                for key in self._open(f.name).keys():
                    self._file_of[key] = f.name
        for name in set(self._file_of.values()):
            if not (self.folder / name).is_file():
                raise ModelError(f"weights file '{name}' named in the index is missing from '{self.folder}'")
    def _open(self, filename: str):
        """A fresh memory map of one file per read: a map kept open keeps every page it ever touched
        resident (and counted in RSS), which for a 7B checkpoint is the whole 13 GB by the end of a run."""
        from safetensors import safe_open

        try:
            return safe_open(str(self.folder / filename), framework="pt")
        except Exception as exc:
            raise ModelError(f"weights file '{self.folder / filename}' is unreadable or truncated: {exc}") from None

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str):
        if key not in self._file_of:
            raise ModelError(f"weight '{key}' is missing from the model's safetensors")
        try:
            return self._open(self._file_of[key]).get_tensor(key)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"cannot read weight '{key}' from '{self._file_of[key]}': {exc}") from None

    def shape_and_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        """Shape and safetensors dtype name (e.g. 'BF16') of a tensor, without reading its data."""
        if key not in self._file_of:
            raise ModelError(f"weight '{key}' is missing from the model's safetensors")
        view = self._open(self._file_of[key]).get_slice(key)
        return tuple(int(d) for d in view.get_shape()), str(view.get_dtype())


class RenamedWeights:
    """A weight store seen under the model's module paths when its checkpoint keeps an older layout: each
    (module prefix, checkpoint prefix) pair of ``FamilySpec.checkpoint_prefixes`` maps the keys that start with
    the checkpoint prefix (Qwen2.5-VL's ``visual.`` -> ``model.visual.``; the text model of a vision-language
    Qwen3.5-MoE, ``model.language_model.`` -> ``model.``); other keys pass through, and so does a key already
    under a module prefix that extends its checkpoint prefix (a checkpoint saved in the module layout)."""

    def __init__(self, store, prefixes: tuple[tuple[str, str], ...]):
        self.store = store
        self.quantization = getattr(store, "quantization", None)
        self._source: dict[str, str] = {}
        for key in store.keys():
            new = next((module + key[len(old):] for module, old in prefixes
                        if key.startswith(old) and not (module.startswith(old) and key.startswith(module))), key)
            self._source[new] = key

    def keys(self) -> list[str]:
        return list(self._source)

    def __contains__(self, key: str) -> bool:
        return key in self._source

    def _key(self, key: str) -> str:
        if key not in self._source:
            raise ModelError(f"weight '{key}' is missing from the model's safetensors")
        return self._source[key]

    def get(self, key: str):
        return self.store.get(self._key(key))

    def shape_and_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        return self.store.shape_and_dtype(self._key(key))


def with_module_paths(store, family):
    """``store`` under the family's module paths (itself when the family declares no checkpoint layout)."""
    return RenamedWeights(store, family.checkpoint_prefixes) if family.checkpoint_prefixes else store


def meta_parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model ``config`` describes (built on the meta device: no memory)."""
    return {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()}


def meta_model(config):
    """The model's module tree on the meta device (names and shapes only)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except TypeError:  # transformers < 4.56
            return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
