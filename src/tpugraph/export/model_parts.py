"""A model's skeleton (weights on the meta device) -> one module at a time with its real weights."""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from ..errors import ModelError
from ..source.families import FamilySpec
from ..source.weights import WeightStore
from .fused_weights import with_fused_weights
from .per_layer_inputs import attach_per_layer_modules, with_per_layer_weights
from .rotary import InterleavedMropeRotaryTable, MropeRotaryTable, RotaryTable

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _BigTensorsOnMeta(TorchFunctionMode):
    """While active (in the calling thread only: torch function modes are thread-local), tensors that
    factory functions create with at least ``min_bytes`` are made on the meta device.

    Building a model under it puts its weights on meta (no memory) while the small tensors a constructor
    computes (rotary inv_freq, Gemma's embed_scale: buffers checkpoints usually lack) keep real values.
    """

    def __init__(self, min_bytes: int):
        super().__init__()
        self.min_bytes = min_bytes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            made = func(*args, **{**kwargs, "device": "meta"})
            if made.numel() * made.element_size() >= self.min_bytes:
                return made
        return func(*args, **kwargs)


META_MIN_BYTES = 4096  # tensors this big are made on meta when the skeleton is built


@contextmanager
def _parameters_on_meta(min_bytes: int = 0) -> Iterator[None]:
    """Tensors that factory functions make in the calling thread (only) with at least ``min_bytes`` go to
    the meta device while the context is active."""
    with _BigTensorsOnMeta(min_bytes):
        yield


def _build_skeleton(config, auto_class: str = "AutoModelForCausalLM") -> nn.Module:
    """The model with its big tensors on meta. A buffer that came out on meta (a constructor computed a
    big one) is built again with a threshold above it, so every buffer is real. ``auto_class``: the
    transformers auto class of the family (FamilySpec.auto_class)."""
    import transformers

    AutoModelForCausalLM = getattr(transformers, auto_class)
    min_bytes = META_MIN_BYTES
    for _ in range(4):
        with _parameters_on_meta(min_bytes):
            # Built in float32 whatever the checkpoint's dtype: buffers (rope, embed scale) then equal
            # those of the float32 reference model verify compares with.
            try:
                skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
            except TypeError:
                skeleton = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        meta_buffers = [b.numel() * b.element_size() for b in skeleton.buffers() if b.device.type == "meta"]
        if not meta_buffers:
            break
        min_bytes = 2 * max(meta_buffers) + 1
    else:
        raise ModelError("cannot build the model's skeleton: some of its buffers stay on the meta device")
    for module in skeleton.modules():  # parameters on meta, whatever their size (as checkpoints give them)
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                setattr(module, name, nn.Parameter(param.to("meta"), requires_grad=param.requires_grad))
    return skeleton


class ModelParts:
    """Materialises a model's modules one at a time: the skeleton's parameters live on the meta device
    (no memory), and each module gets its weights from the memory-mapped safetensors only while it is
    exported."""

    def __init__(self, config, family: FamilySpec, weights: WeightStore, dtype: str = "float32", num_device: int = 1):
        import transformers

        family.check_transformers(transformers.__version__)
        config = copy.deepcopy(config)  # from_config writes dtype and attention choices into it
        self.config = config
        self.family = family
        self.weights = with_fused_weights(weights, family)  # fused_weights: MoE experts as transformers holds them
        self.dtype_name = dtype
        self.dtype = TORCH_DTYPES[dtype]
        self.num_device = num_device  # > 1: blocks in the form tpu-mlir's device-parallel pass splits
        config._attn_implementation = "eager"
        self.skeleton = _build_skeleton(config, family.auto_class)
        self.skeleton.eval()
        self._init_views()
        # Per-layer embeddings (Gemma 4): each layer's rows of the model-level projection, as its own weights.
        self.weights = with_per_layer_weights(self.weights, family, self.text_config)
        attach_per_layer_modules(self.skeleton, family, self.text_config)

    def _init_views(self) -> None:
        self.text_config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        self._rotary_tables: dict[tuple, RotaryTable] = {}
        # data_ptr of a placeholder parameter -> the checkpoint key its values are read from when written
        self._placeholders: dict[int, str] = {}

    def with_weights(self, weights) -> "ModelParts":
        """The same model (its skeleton is shared, read only) whose weights come from ``weights``."""
        other = copy.copy(self)
        other.weights = weights
        other._init_views()
        return other

    def _submodule(self, path: str) -> nn.Module:
        try:
            return self.skeleton.get_submodule(path)
        except AttributeError:
            raise ModelError(f"{type(self.skeleton).__name__} has no module '{path}' (family {self.family.name})") from None

    def _has_module(self, path: str) -> bool:
        try:
            self.skeleton.get_submodule(path)
            return True
        except AttributeError:
            return False

    def checkpoint_key(self, module_path: str, param: str) -> str:
        key = f"{module_path}.{param}"
        if key in self.weights:
            return key
        if module_path == self.family.lm_head_path and self.tied:
            tied = f"{self.family.embed_path}.{param}"
            if tied in self.weights:
                return tied
        raise ModelError(f"weight '{key}' is missing from the model's safetensors")

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False)) or (
            f"{self.family.lm_head_path}.weight" not in self.weights
        )

    @contextmanager
    def materialized(self, path: str, placeholders_from: int | None = None) -> Iterator[nn.Module]:
        """A real (CPU) copy of the module at ``path`` with its weights; freed on exit.

        With ``placeholders_from``, parameters of at least that many bytes are *placeholders*: allocated,
        never read from the checkpoint (pages never touched cost no memory). Tracing needs only their
        shapes; ``placeholder_key`` tells which checkpoint tensor to read when the weight is written."""
        meta = self._submodule(path)
        module = copy.deepcopy(meta)  # parameters on meta (free), buffers real (small)
        persistent = set(meta.state_dict().keys())
        state, placeholders = {}, []
        for name, param in meta.named_parameters():
            key = self.checkpoint_key(path, name)
            if placeholders_from is not None and param.is_floating_point() \
                    and param.numel() * self.dtype.itemsize >= placeholders_from:
                state[name] = torch.empty(param.shape, dtype=self.dtype)
                placeholders.append(state[name].data_ptr())
                self._placeholders[placeholders[-1]] = key
            else:
                state[name] = self.weights.get(key).to(self.dtype)
        for name, buf in meta.named_buffers():
            key = f"{path}.{name}"
            if name in persistent and key in self.weights:
                state[name] = self.weights.get(key).to(buf.dtype)
        module.load_state_dict(state, strict=False, assign=True)
        module.eval()
        try:
            yield module
        finally:
            for ptr in placeholders:
                self._placeholders.pop(ptr, None)
            del module, state

    def placeholder_key(self, tensor: torch.Tensor) -> str | None:
        """The checkpoint key of a placeholder parameter (inside its ``materialized`` context), else None."""
        return self._placeholders.get(tensor.data_ptr())

    def rotary_table(self, seq: int, layer: int) -> RotaryTable:
        """cos/sin of ``layer`` for positions 0..SEQ-1, from the model's own rotary module."""
        fam = self.family
        path, kwargs = fam.rotary_path, fam.rotary_call_kwargs(self.text_config, layer)
        if kwargs and not (self._has_module(path) and _accepts(self._submodule(path).forward, *kwargs)):
            # Older transformers: one rotary module per layer type rather than one taking the type.
            path, kwargs = fam.rotary_module_path(self.text_config, layer), {}
        key = (seq, path, tuple(sorted(kwargs.items())))
        if key not in self._rotary_tables:
            table = RotaryTable.from_hf(self._submodule(path), seq, self.dtype, **kwargs)
            sections = fam.mrope_section(self.text_config)
            mrope = InterleavedMropeRotaryTable if fam.mrope_interleaved else MropeRotaryTable
            self._rotary_tables[key] = mrope.of(table, sections) if sections else table
        return self._rotary_tables[key]

    def sliding_window(self, layer: int) -> int | None:
        return self.family.sliding_window(self.text_config, layer)

    def embed_scale(self, embed: nn.Module) -> float | None:
        # transformers 5.x Gemma scales inside its embedding module; 4.x did it in the model forward.
        if hasattr(embed, "embed_scale"):
            return None
        return self.family.embedding_scale(self.text_config)

    def final_softcap(self) -> float | None:
        return self.family.final_softcap(self.text_config)

    def logits_scale(self) -> float | None:
        return self.family.logits_scale(self.text_config)


def _accepts(fn, *names: str) -> bool:
    params = inspect.signature(fn).parameters
    return all(n in params for n in names) or any(p.kind == p.VAR_KEYWORD for p in params.values())


