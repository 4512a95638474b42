"""The family registry: what tpugraph knows about each model family, declared as data.

The generic exporter reads these attributes; it never branches on ``model_type`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class FamilySpec:
    """How one family of Hugging Face causal LMs maps onto the TPU segments."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    min_transformers: str = "4.45"
    # Dotted module paths inside the ``*ForCausalLM`` model.
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    rotary_path: str = "model.rotary_emb"
    # The model forward multiplies the token embeddings by sqrt(hidden_size) (Gemma 1/2).
    scale_embedding_by_sqrt_hidden: bool = False
    # Config attribute holding the final logit soft-cap (Gemma 2), applied in lm_head.
    final_softcap_attr: str | None = None
    # Config attribute of the sliding attention window, if the family has one.
    sliding_window_attr: str | None = None
    quirks: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        return ", ".join(self.quirks) if self.quirks else "standard pre-norm decoder"


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="llama",
        model_types=("llama",),
        architectures=("LlamaForCausalLM",),
        quirks=("GQA", "rope scaling (llama3, linear, dynamic-free)", "optional explicit head_dim", "tied or untied embeddings"),
    ),
)


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES for a in f.architectures)


def family_for(model_type: str | None, architectures: list[str] | None) -> FamilySpec:
    """The family of a config, or an error naming what was asked and what is supported."""
    for fam in FAMILIES:
        if architectures and any(a in fam.architectures for a in architectures):
            return fam
    for fam in FAMILIES:
        if not architectures and model_type in fam.model_types:
            return fam
    what = ", ".join(architectures) if architectures else f"model_type '{model_type}'"
    raise UnsupportedModelError(
        f"unsupported architecture {what}; supported: {', '.join(supported_architectures())}"
    )
