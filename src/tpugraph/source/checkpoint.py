"""MODEL argument -> a checked model folder (or .gguf file), its facts, and a memory-mapped view of its weights.

``open_weights`` is the one place that decides how weights are read: plain safetensors (``WeightStore``),
safetensors with a quantization_config (``quantized.QuantizedWeights``: packed layers dequantized
when read) or a .gguf file (``gguf.GgufWeights``). All three present the same interface: the
model's Hugging Face parameter names, one float tensor per ``get``, shapes without reading data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..contract.manifest_records import ModelFacts, SourceRecord
from ..errors import ModelError, UnsupportedModelError
from .families import FamilySpec, family_for
from .weights import WeightStore

log = logging.getLogger(__name__)

PRESET_PACKAGE = "tpugraph.source.presets"


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    path = resources.files(PRESET_PACKAGE) / f"{name}.json"
    if not path.is_file():
        raise ModelError(f"no preset named '{name}'; presets: {', '.join(preset_names())}")
    return json.loads(path.read_text())


def cache_dir() -> Path:
    base = os.environ.get("TPUGRAPH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tpugraph")
    return Path(base)


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers inside tpugraph's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def materialize_preset(name: str) -> Path:
    """Write the preset's random-weight model once (deterministic seed) and return its folder."""
    preset = load_preset(name)
    import transformers

    key = hashlib.sha256(
        json.dumps({"preset": preset, "transformers": transformers.__version__}, sort_keys=True).encode()
    ).hexdigest()[:12]
    target = cache_dir() / "presets" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    cfg_dict = dict(preset["config"])
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    torch.manual_seed(int(preset.get("seed", 0)))
    model = AutoModelForCausalLM.from_config(config)
    noise = float(preset.get("norm_noise", 0.0))
    if noise:
        with torch.no_grad():  # trained norms are not all ones: make the preset look like a trained model
            for pname, param in model.named_parameters():
                if "norm" in pname and pname.endswith("weight"):
                    param.add_(torch.randn_like(param) * noise)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    log.info("preset %s materialised at %s (random weights)", name, target)
    return target


@dataclass
class ModelSource:
    """Where a model came from: a local folder, a .gguf file (``path`` its folder, ``gguf_file`` its name),
    or a built-in preset materialised into a folder."""

    path: Path
    preset: str | None = None
    gguf_file: str | None = None

    @property
    def random_weights(self) -> bool:
        return self.preset is not None

    @property
    def gguf_path(self) -> Path | None:
        return self.path / self.gguf_file if self.gguf_file else None

    def record(self) -> SourceRecord:
        # For a GGUF source "path" is the file itself: what `verify --model` and `export-and-optimize` take.
        return SourceRecord(path=str(self.gguf_path or self.path), preset=self.preset,
                            random_weights=self.random_weights, gguf_file=self.gguf_file)


def is_gguf_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def resolve_model(model: str, gguf_file: str | None = None) -> ModelSource:
    """A folder path, a .gguf file or a preset name -> a ModelSource. A folder holds config.json and
    safetensors, or a .gguf file (``gguf_file`` picks one; a folder with a single .gguf and no config.json
    needs no choice)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            if is_gguf_file(path):
                if gguf_file and gguf_file != path.name:
                    raise ModelError(f"--gguf-file '{gguf_file}' given, but MODEL is the file '{path.name}'")
                return ModelSource(path=path.resolve().parent, gguf_file=path.name)
            raise ModelError(f"model '{model}' is a file, not a model folder (config.json + *.safetensors) "
                             "nor a .gguf file")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelError(f"model folder '{model}' is not readable")
        if gguf_file:
            if not is_gguf_file(path / gguf_file):
                raise ModelError(f"--gguf-file '{gguf_file}' is not a .gguf file in '{model}'")
            return ModelSource(path=path.resolve(), gguf_file=gguf_file)
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf") if p.is_file())
            if len(ggufs) == 1:
                return ModelSource(path=path.resolve(), gguf_file=ggufs[0])
            if ggufs:
                raise ModelError(f"'{model}' holds several .gguf files ({', '.join(ggufs)}); pick one with --gguf-file")
            raise ModelError(f"'{model}' is not a model folder: it has no config.json (nor a .gguf file)")
        return ModelSource(path=path.resolve())
    if gguf_file:
        raise ModelError(f"--gguf-file needs MODEL to be the folder holding it ('{model}' not found)")
    if model in preset_names():
        return ModelSource(path=materialize_preset(model), preset=model)
    raise ModelError(
        f"model '{model}' not found: give a local model folder or a preset ({', '.join(preset_names())})"
    )


REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def read_config_json(folder: Path) -> dict[str, Any]:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{folder / 'config.json'} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except OSError as exc:
        raise ModelError(f"cannot read {folder / 'config.json'}: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{folder / 'config.json'} is not a JSON object")
    return raw


def load_gguf_config(source: ModelSource):
    """The transformers config transformers itself builds from a .gguf file's metadata."""
    from transformers import AutoConfig

    from .gguf import open_reader

    open_reader(source.gguf_path)  # a truncated or foreign file: one clear line, before transformers sees it
    try:
        config = AutoConfig.from_pretrained(str(source.path), gguf_file=source.gguf_file)
    except Exception as exc:  # transformers raises ValueError/KeyError/ImportError for what it cannot map
        raise ModelError(f"transformers cannot build a config from '{source.gguf_path}': "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    family = family_for(config.model_type, list(getattr(config, "architectures", None) or []))
    return config, family


def load_config(source: ModelSource, trust_remote_code: bool = False):
    """The transformers config of a model folder, after the checks that give one clear line each."""
    if source.gguf_file:
        return load_gguf_config(source)
    raw = read_config_json(source.path)
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if "auto_map" in raw and not trust_remote_code:
        raise UnsupportedModelError(
            f"model '{source.path}' needs remote code ({', '.join(archs) or model_type}); tpugraph does not run it "
            "unless --trust-remote-code is given"
        )
    family = family_for(model_type, archs)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a bad config
        raise ModelError(f"transformers cannot read {source.path / 'config.json'}: {str(exc).splitlines()[0]}") from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    missing = [f for f in REQUIRED_FIELDS if getattr(text_config, f, None) in (None, 0)]
    if missing:
        raise ModelError(f"{source.path / 'config.json'} lacks required fields: {', '.join(missing)}")
    family.check_config(text_config)
    return config, family


def model_facts(config, family: FamilySpec) -> ModelFacts:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(c.num_attention_heads)
    if family.per_layer_attention:  # per-layer head dims (Gemma 4): layer 0's here, every layer's in layers_kv
        kv_heads, head_dim = family.layer_kv_shape(c, 0)
    else:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope = dict(rope) if isinstance(rope, dict) else {}
    if "rope_theta" not in rope and getattr(c, "rope_theta", None) is not None:
        rope["rope_theta"] = c.rope_theta
    # transformers warns on stderr when torch_dtype is read (5.x); a vision-language family is 5.x only
    dtype = getattr(c, "dtype", None) or (None if family.vision else getattr(c, "torch_dtype", None))
    return ModelFacts(
        architecture=(getattr(config, "architectures", None) or [family.architectures[0]])[0],
        model_type=c.model_type,
        family=family.name,
        num_layers=int(c.num_hidden_layers),
        hidden_size=int(c.hidden_size),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        vocab_size=int(c.vocab_size),
        max_positions=int(getattr(c, "max_position_embeddings", 0) or 0),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope=json.loads(json.dumps(rope, default=str)),
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_id=getattr(c, "eos_token_id", None),
        dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
    )


def quantization_config(source: ModelSource) -> dict[str, Any] | None:
    """The quantization_config of a safetensors folder's config.json (None: plain weights or a GGUF file)."""
    if source.gguf_file:
        return None
    qc = read_config_json(source.path).get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ModelError(f"{source.path / 'config.json'}: quantization_config is not a JSON object")
    return qc


def open_weights(source: ModelSource, config):
    """The model's weights as one interface (keys, ``in``, get, shape_and_dtype, ``quantization``): plain
    safetensors, packed GPTQ/AWQ/AutoRound layers dequantized when read, or a .gguf file's tensors."""
    if source.gguf_file:
        from .gguf import GgufWeights

        return GgufWeights(source.gguf_path, config)
    from .weights import with_module_paths

    family = family_for(getattr(config, "model_type", None), list(getattr(config, "architectures", None) or []))
    qc = quantization_config(source)
    if qc is None:
        return with_module_paths(WeightStore(source.path), family)
    from .quantized import QuantizedWeights, scheme_from_config

    return QuantizedWeights(with_module_paths(WeightStore(source.path), family), scheme_from_config(qc), config)


def load_tokenizer(source: ModelSource):
    """The model's tokenizer (save_pretrained-able): from the folder, or built from a .gguf file's metadata
    the way transformers does it."""
    from transformers import AutoTokenizer

    try:
        if source.gguf_file:
            return AutoTokenizer.from_pretrained(str(source.path), gguf_file=source.gguf_file)
        return AutoTokenizer.from_pretrained(str(source.path))
    except Exception as exc:
        raise ModelError(f"no usable tokenizer in '{source.gguf_path or source.path}': "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
