"""The family registry: what tpugraph knows about each model family, declared as data.

The generic exporter reads these attributes; it never branches on ``model_type`` itself. What a
Hugging Face decoder layer does internally (q/k norms, fused projections, partial rotary, parallel
attention/MLP, attention soft-capping, query_pre_attn_scalar) needs no declaration: the exporter
calls transformers' own layer modules. A spec declares only what the *model* forward does around the
layers (embedding and logit scaling, the final norm's path, per-layer rotary and sliding windows),
because each segment replaces that forward.

Why this module is long: it is the registry itself, one declarative entry per family (about forty) beside the
FamilySpec they fill in. Keeping every family's knowledge in one table is the point; the code that acts on it
lives elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedModelError

# Values of ``sliding_layers``.
SLIDING_NONE = "none"  # the family has no sliding-window attention
SLIDING_ALL = "all"  # every layer uses the window when the config sets one (Mistral, Phi-3)
SLIDING_BY_LAYER_TYPE = "layer_types"  # layers whose config.layer_types[i] == "sliding_attention"

SLIDING_LAYER_TYPE = "sliding_attention"

# Values of ``kv_sharing``.
KV_SHARING_NONE = "none"  # every layer has its own KV cache
# config.kv_sharing_modes[i] == "reuse": layer i attends over the keys/values of the last earlier layer of the
# same type that is not itself a reusing layer (Gemma 4: the last num_kv_shared_layers layers).
KV_SHARING_BY_MODES = "kv_sharing_modes"


@dataclass(frozen=True)
class PerLayerEmbedding:
    """An extra token table gathered per token and fed, with a per-layer projection of the token embedding,
    into every decoder layer (Gemma 4's per-layer embeddings). Paths are inside the *ForCausalLM model.

    The embedding segments gather the table (scaled as its module scales it) into ``per_layer_embeds``
    [1, S, L, P]; block i takes its slice [1, S, P] and the token embedding [1, S, H] and computes the
    rest itself: ``(norm(projection_i(embeds) * projection_scale) + slice) * input_scale``, where
    projection_i is rows i*P..(i+1)*P of the model's projection (see README, "Gemma 4").
    """

    table_path: str
    projection_path: str
    norm_path: str
    width_attr: str  # config attribute of P
    projection_scale_attr: str  # attributes of the text model holding the two scales
    input_scale_attr: str
    layer_kwarg: str = "per_layer_input"  # what the decoder layer's forward takes its [1, S, P] input as

    def width(self, text_config: Any) -> int:
        return int(getattr(text_config, self.width_attr, 0) or 0)


@dataclass(frozen=True)
class VisionSpec:
    """A vision encoder in front of the language model (vision-language families). ``kind`` names the ``vit``
    segment's wrapper (export/vision.py) and the host code that prepares its inputs (runtime/vision.py); the
    paths and config attributes are read from the model. docs/guides/vision-language.md has the vit contract."""

    kind: str  # "qwen2_5_vl", "qwen3_vl", "gemma3", "internvl"
    path: str  # the vision tower inside the model (module path)
    projector_path: str | None = None  # a projector outside the tower, in the vit segment too (Gemma 3)
    image_token_attr: str = "image_token_id"  # config attributes of the prompt's image tokens
    vision_start_attr: str = "vision_start_token_id"
    vision_end_attr: str = "vision_end_token_id"
    default_max_pixels: int = 224 * 224  # --max-pixels when none is given: 256 patches, 64 image tokens
    # The prompt token the image goes at: "image" (Qwen: the placeholder between its brackets, repeated) or "start"
    # (Gemma 3: <start_of_image>, followed by the image tokens and <end_of_image>).
    placeholder: str = "image"
    # The image tokens attend to each other both ways in the prefill (Gemma 3), besides causally to the text.
    bidirectional_image: bool = False
    # The placeholder alone stands for the image: it becomes the whole block, start + image tokens + end (InternVL's
    # <IMG_CONTEXT> -> <img> <IMG_CONTEXT> x N </img>), instead of being repeated between brackets already there.
    bracketed: bool = False
    # Brackets that are tokenizer tokens, not config attributes (InternVL's <img> and </img>): their text, looked up
    # in the source's tokenizer at export; None reads the *_attr above.
    start_token: str | None = None
    end_token: str | None = None

    def token_ids(self, config: Any, token_id: Any = None) -> dict[str, int]:
        """The image placeholder and its brackets, by role (image, start, end); a bracket declared by its text is
        looked up with ``token_id`` (text -> id: the source's tokenizer)."""
        return {role: int(getattr(config, attr)) if text is None else int(token_id(text)) for role, attr, text in (
            ("image", self.image_token_attr, None), ("start", self.vision_start_attr, self.start_token),
            ("end", self.vision_end_attr, self.end_token))}


@dataclass(frozen=True)
class FamilySpec:
    """How one family of Hugging Face causal LMs maps onto the TPU segments."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    # Oldest transformers release the family's tests/integration/families/ modules passed on, of the four checked:
    # 4.45.2, 4.51.3, 4.57.1, 5.24.0 (below 4.56, with verify loading the reference by torch_dtype).
    # Older releases may work; they are refused because they were not checked (check_transformers).
    min_transformers: str = "4.57"
    # Dotted module paths inside the ``*ForCausalLM`` model.
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    rotary_path: str = "model.rotary_emb"
    # The rotary module is called per layer type (Gemma 3: local and global layers use different rope).
    rotary_per_layer_type: bool = False
    # Where transformers keeps one rotary module per layer type instead (Gemma 3 on 4.x:
    # model.rotary_emb_local for sliding layers): (layer type, module path) pairs.
    rotary_modules_by_layer_type: tuple[tuple[str, str], ...] = ()
    # What the model forward multiplies the token embeddings by: "sqrt_hidden" (Gemma) or the name of a
    # config attribute (Granite's embedding_multiplier). Skipped when the embedding module already
    # applies it itself (transformers 5.x Gemma's ScaledWordEmbedding has an ``embed_scale``).
    embedding_multiplier: str | None = None
    # Config attributes of what the *ForCausalLM forward does to the logits, applied in lm_head.
    logits_multiplier_attr: str | None = None  # Cohere: logits * logit_scale
    logits_divisor_attr: str | None = None  # Granite: logits / logits_scaling
    final_softcap_attr: str | None = None  # Gemma 2/3: tanh(logits / cap) * cap
    # Sliding-window attention: which layers, and the config attribute of the window.
    sliding_layers: str = SLIDING_NONE
    sliding_window_attr: str = "sliding_window"
    # Rewrites of the decoder layer the exporter applies (export/family_layers.py): static-shape equivalents
    # of what transformers does in a way the ONNX exporter or tpu-mlir cannot take.
    layer_rewrites: tuple[str, ...] = ()
    # Parameters transformers fuses on load, each with the checkpoint keys (under a layer) it is made of;
    # "{e}" numbers the experts (stacked), the sources of one expert are concatenated (export/fused_weights.py).
    fused_weights: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Per-layer embeddings (Gemma 4), or None.
    per_layer_embedding: PerLayerEmbedding | None = None
    # Layers that attend over an earlier layer's keys/values instead of their own (no KV cache of their own).
    kv_sharing: str = KV_SHARING_NONE
    kv_sharing_kwarg: str = "shared_kv_states"  # the decoder layer's argument carrying the shared KV
    # Head dim and KV heads differ per layer: read from config.per_layer_config[i] (Gemma 4's full layers).
    per_layer_attention: bool = False
    # Export options this family's segments cannot honour: (ExportOptions field, the values it can take, why).
    # Any other value is refused with one line (exit 2) before anything is written.
    refused_options: tuple[tuple[str, tuple[Any, ...], str], ...] = ()
    # Config attributes that, when set (truthy), make a checkpoint of the family one tpugraph cannot export
    # yet: (attribute, why); refused with the reason (exit 4).
    refused_configs: tuple[tuple[str, str], ...] = ()
    # Embedding tying the family ships with: "tied", "untied" or "either" (both exist in the wild).
    embeddings: str = "either"
    # Layers that carry a state instead of a KV cache (export/linear_attention.py): the config.layer_types value
    # of such layers, and the kind of state ("gated_deltanet": conv state + recurrent state; "short_conv": a conv
    # state only).
    state_layer_type: str | None = None
    state_kind: str | None = None
    quirks: tuple[str, ...] = field(default_factory=tuple)
    # A prefill on top of a KV history (--history-kv: block_kv_i, multi-turn chat, chunked prefill) is exact
    # whenever a layer's only state is its KV cache and its attention reads that cache through the mask and
    # position ids alone (sliding windows are applied from the absolute positions of both sides). A family for
    # which it is not refuses the option in refused_options, saying why, like any other option.
    # compile --dynamic (prefill nets run at the prompt's length) was run on the cmodel for this family's blocks.
    # tpu-mlir 1.30.2's dynamic code aborts on blocks the Rope/FAttention fusion leaves partly unfused (Slice,
    # Permute, Tile...): gemma2, gemma3, glm4, phi3 at run time, even at the full length, phi at deploy. So only
    # the families checked are compiled --dynamic; the others are refused with one line.
    dynamic_prefill: bool = False
    # The transformers auto class that builds the whole model from its config (vision-language models are not
    # causal LMs to transformers' auto mapping).
    auto_class: str = "AutoModelForCausalLM"
    # Checkpoints saved in an older layout than transformers' module tree: (module path prefix, checkpoint prefix)
    # pairs, tried in order (source/weights.py RenamedWeights). Every path above is a module path.
    checkpoint_prefixes: tuple[tuple[str, str], ...] = ()
    # Multimodal rotary positions (Qwen2-VL's mrope): block position_ids are [3, L] (temporal, height, width) and
    # the rotary lanes take their row by config.rope_parameters["mrope_section"]; text tokens have three equal rows.
    mrope: bool = False
    # Qwen3-VL's interleaved mrope: the rotary lanes cycle t, h, w (lane j of half the head dim reads row 1 when
    # j % 3 == 1 and j < 3 * section[1], row 2 when j % 3 == 2 and j < 3 * section[2], else row 0) instead of
    # taking contiguous runs of mrope_section lanes.
    mrope_interleaved: bool = False
    # The vision encoder of a vision-language family (the ``vit`` segment), or None.
    vision: VisionSpec | None = None

    def mrope_section(self, text_config: Any) -> tuple[int, ...]:
        """The rotary lanes (of half the head dim) each position row drives; () without mrope."""
        if not self.mrope:
            return ()
        rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        return tuple(int(x) for x in rope.get("mrope_section", (16, 24, 24)))

    def describe(self) -> str:
        return ", ".join(self.quirks) if self.quirks else "standard pre-norm decoder"

    # -- per-config facts the exporter asks for; each reads only declared attributes ----------------

    def sliding_window(self, text_config: Any, layer: int) -> int | None:
        """The attention window of ``layer`` in tokens, or None for full causal attention."""
        if self.sliding_layers == SLIDING_NONE:
            return None
        window = getattr(text_config, self.sliding_window_attr, None)
        if not window:
            return None
        if self.sliding_layers == SLIDING_BY_LAYER_TYPE:
            types = getattr(text_config, "layer_types", None)
            if not types or types[layer] != SLIDING_LAYER_TYPE:
                return None
        return int(window)

    def layer_type(self, text_config: Any, layer: int) -> str | None:
        types = getattr(text_config, "layer_types", None)
        return types[layer] if types else None

    def refused_option(self, options: Any) -> tuple[str, str] | None:
        """(option, reason) of the first export option set in ``options`` that this family refuses."""
        for option, allowed, why in self.refused_options:
            if getattr(options, option, allowed[0]) not in allowed:
                return option, why
        return None

    def state_layers(self, text_config: Any) -> tuple[int, ...]:
        """Indices of the layers whose segments carry a state instead of a KV cache."""
        if self.state_layer_type is None:
            return ()
        types = getattr(text_config, "layer_types", None) or []
        return tuple(i for i, t in enumerate(types) if t == self.state_layer_type)

    def state_shapes(self, text_config: Any) -> dict[str, tuple[int, ...]]:
        """Shapes of a state layer's states, by input name; empty for a family without state layers."""
        c = text_config
        if self.state_kind == "short_conv":  # LFM2: the last K inputs of the depthwise conv over B * x
            return {"conv_state": (1, int(c.hidden_size), int(c.conv_L_cache))}
        if self.state_kind != "gated_deltanet":
            return {}
        key_dim = int(c.linear_num_key_heads) * int(c.linear_key_head_dim)
        value_dim = int(c.linear_num_value_heads) * int(c.linear_value_head_dim)
        return {"conv_state": (1, 2 * key_dim + value_dim, int(c.linear_conv_kernel_dim)),
                "recurrent_state": (1, int(c.linear_num_value_heads), int(c.linear_key_head_dim),
                                    int(c.linear_value_head_dim))}

    def rotary_call_kwargs(self, text_config: Any, layer: int) -> dict[str, Any]:
        """Extra keyword arguments of the rotary module's forward for ``layer``."""
        if self.rotary_per_layer_type:
            return {"layer_type": self.layer_type(text_config, layer)}
        return {}

    def rotary_module_path(self, text_config: Any, layer: int) -> str:
        """The separate rotary module of ``layer``'s type, if the family declares one, else rotary_path."""
        return dict(self.rotary_modules_by_layer_type).get(self.layer_type(text_config, layer), self.rotary_path)

    def embedding_scale(self, text_config: Any) -> float | None:
        if self.embedding_multiplier is None:
            return None
        if self.embedding_multiplier == "sqrt_hidden":
            return float(text_config.hidden_size) ** 0.5
        value = getattr(text_config, self.embedding_multiplier, None)
        return None if value in (None, 1, 1.0) else float(value)

    def logits_scale(self, text_config: Any) -> float | None:
        """The factor the logits are multiplied by before soft-capping, or None."""
        scale = 1.0
        if self.logits_multiplier_attr:
            scale *= float(getattr(text_config, self.logits_multiplier_attr, None) or 1.0)
        if self.logits_divisor_attr:
            scale /= float(getattr(text_config, self.logits_divisor_attr, None) or 1.0)
        return None if scale == 1.0 else scale

    def final_softcap(self, text_config: Any) -> float | None:
        value = getattr(text_config, self.final_softcap_attr, None) if self.final_softcap_attr else None
        return float(value) if value else None

    def layer_kv_shape(self, text_config: Any, layer: int) -> tuple[int, int]:
        """(KV heads, head dim) of ``layer``'s keys and values."""
        c = text_config.per_layer_config[layer] if self.per_layer_attention else text_config
        heads = int(c.num_attention_heads)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return int(getattr(c, "num_key_value_heads", None) or heads), int(head_dim)

    def kv_sources(self, text_config: Any) -> list[int | None]:
        """Per layer: the earlier layer whose keys/values it attends over, or None (its own KV cache)."""
        layers = int(text_config.num_hidden_layers)
        if self.kv_sharing == KV_SHARING_NONE:
            return [None] * layers
        modes = list(getattr(text_config, self.kv_sharing))
        types = getattr(text_config, "layer_types", None)
        sources: list[int | None] = []
        for i, mode in enumerate(modes):
            if mode != "reuse":
                sources.append(None)
                continue
            owners = [j for j in range(i) if modes[j] != "reuse" and (not types or types[j] == types[i])]
            if not owners:
                raise UnsupportedModelError(f"layer {i} reuses the KV of an earlier layer of its type, and there is none")
            sources.append(owners[-1])
        return sources

    def check_transformers(self, installed: str) -> None:
        """Refuse a transformers older than the family was verified with: its module layout (rotary,
        cache and mask arguments) differs, and the export could be silently wrong rather than fail."""
        from packaging.version import Version  # a dependency of transformers

        if Version(installed).release < Version(self.min_transformers).release:
            raise UnsupportedModelError(
                f"family '{self.name}' ({', '.join(self.architectures)}) needs transformers>={self.min_transformers}; "
                f"installed is {installed}"
            )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "architectures": list(self.architectures), "model_types": list(self.model_types),
                "min_transformers": self.min_transformers, "embeddings": self.embeddings,
                "sliding_window": self.sliding_layers, "quirks": list(self.quirks)}

    def check_config(self, text_config: Any) -> None:
        """Refuse a checkpoint of the family that sets what tpugraph cannot export yet (refused_configs)."""
        for attr, why in self.refused_configs:
            if getattr(text_config, attr, None):
                raise UnsupportedModelError(f"{self.name} with {attr} is not supported yet: {why}")


# Qwen MoE checkpoints: one gate/up/down matrix per expert; transformers fuses them into 3-D parameters.
QWEN_EXPERTS = (("mlp.experts.gate_up_proj", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")),
                ("mlp.experts.down_proj", ("mlp.experts.{e}.down_proj.weight",)))

# What the state segments of gated-DeltaNet layers (export/linear_attention.py) cannot honour.
GATED_DELTANET_REFUSALS = (
    ("naming", (None, "llm-tpu"), "the conv and recurrent state inputs/outputs of its linear-attention "
                                  "layers have names only in the llm-tpu convention"),
    ("history_kv", (False, None), "its linear-attention layers would need a prefill that starts from "
                                  "their conv and recurrent state, which tpugraph does not export yet"),
    ("max_input_length", (None,), "a prompt fed in chunks would need its linear-attention layers to "
                                  "prefill from their conv and recurrent state, which tpugraph does not "
                                  "export yet (the prefill takes the whole window, SEQ)"),
)

SHORT_CONV_REFUSALS = (
    ("naming", (None, "llm-tpu"), "the conv state inputs/outputs of its short-convolution layers have "
                                  "names only in the llm-tpu convention"),
    ("history_kv", (False, None), "its short-convolution layers would need a prefill that starts from "
                                  "their conv state, which tpugraph does not export yet"),
    ("max_input_length", (None,), "a prompt fed in chunks would need its short-convolution layers to "
                                  "prefill from their conv state, which tpugraph does not export yet "
                                  "(the prefill takes the whole window, SEQ)"),
)

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="llama",
        dynamic_prefill=True,
        # transformers maps internlm3 onto LlamaForCausalLM (InternLM3's own checkpoints name InternLM3ForCausalLM).
        model_types=("llama", "internlm3"),
        architectures=("LlamaForCausalLM", "InternLM3ForCausalLM"),
        min_transformers="4.45",
        quirks=("Llama 2/3.x", "InternLM3 (native in transformers, as Llama)", "GQA", "rope scaling (llama3, linear, yarn)", "optional explicit head_dim",
                "optional attention/MLP bias"),
    ),
    FamilySpec(
        name="mistral",
        model_types=("mistral",),
        architectures=("MistralForCausalLM",),
        min_transformers="4.51",
        sliding_layers=SLIDING_ALL,
        embeddings="untied",
        quirks=("GQA", "sliding-window attention on every layer"),
    ),
    FamilySpec(
        name="qwen2",
        dynamic_prefill=True,
        model_types=("qwen2",),
        architectures=("Qwen2ForCausalLM",),
        min_transformers="4.57",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        quirks=("Qwen2/2.5", "q/k/v bias", "GQA", "optional sliding window on upper layers"),
    ),
    FamilySpec(
        name="qwen3",
        dynamic_prefill=True,
        model_types=("qwen3",),
        architectures=("Qwen3ForCausalLM",),
        min_transformers="4.51",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        quirks=("q/k RMSNorm", "explicit head_dim", "GQA"),
    ),
    FamilySpec(
        name="phi3",
        model_types=("phi3",),
        architectures=("Phi3ForCausalLM",),
        min_transformers="4.51",
        sliding_layers=SLIDING_ALL,
        embeddings="untied",
        quirks=("fused qkv and gate_up projections", "longrope/su rope scaling", "sliding window"),
    ),
    FamilySpec(
        name="phi",
        model_types=("phi",),
        architectures=("PhiForCausalLM",),
        min_transformers="4.51",
        norm_path="model.final_layernorm",
        embeddings="untied",
        quirks=("phi-1/1.5/2", "partial rotary", "parallel attention and MLP", "LayerNorm", "lm_head bias"),
    ),
    FamilySpec(
        name="gemma",
        model_types=("gemma",),
        architectures=("GemmaForCausalLM",),
        min_transformers="4.51",
        embedding_multiplier="sqrt_hidden",
        embeddings="tied",
        quirks=("embedding scaled by sqrt(hidden)", "RMSNorm (1 + w)", "GeGLU"),
    ),
    FamilySpec(
        name="gemma2",
        model_types=("gemma2",),
        architectures=("Gemma2ForCausalLM",),
        min_transformers="4.57",
        embedding_multiplier="sqrt_hidden",
        final_softcap_attr="final_logit_softcapping",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        embeddings="tied",
        quirks=("embedding scaled by sqrt(hidden)", "attention and final logit soft-capping",
                "query_pre_attn_scalar", "sandwich norms", "alternating sliding-window layers"),
    ),
    FamilySpec(
        name="gemma3",
        model_types=("gemma3_text",),
        architectures=("Gemma3ForCausalLM",),
        min_transformers="4.57",
        embedding_multiplier="sqrt_hidden",
        final_softcap_attr="final_logit_softcapping",
        rotary_per_layer_type=True,
        rotary_modules_by_layer_type=((SLIDING_LAYER_TYPE, "model.rotary_emb_local"),),
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        embeddings="tied",
        quirks=("text model only", "embedding scaled by sqrt(hidden)", "q/k RMSNorm", "query_pre_attn_scalar",
                "local/global rope per layer type", "sliding-window layers"),
    ),
    # Further families: Llama-shaped models whose quirks live inside transformers' own layer modules
    # (or are declared above), each with a tiny-model test in tests/integration/families/.
    FamilySpec(
        name="granite",
        model_types=("granite",),
        architectures=("GraniteForCausalLM",),
        min_transformers="4.45",
        embedding_multiplier="embedding_multiplier",
        logits_divisor_attr="logits_scaling",
        quirks=("IBM Granite 3.x", "embedding/residual/attention multipliers", "logits / logits_scaling"),
    ),
    FamilySpec(
        name="cohere",
        model_types=("cohere",),
        architectures=("CohereForCausalLM",),
        min_transformers="4.45",
        logits_multiplier_attr="logit_scale",
        embeddings="tied",
        quirks=("Command-R", "bias-free LayerNorm", "parallel attention and MLP", "interleaved rotary",
                "logits * logit_scale", "optional q/k LayerNorm"),
    ),
    FamilySpec(
        name="cohere2",
        model_types=("cohere2",),
        architectures=("Cohere2ForCausalLM",),
        min_transformers="4.57",
        logits_multiplier_attr="logit_scale",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        embeddings="tied",
        quirks=("Command R7B / A", "sliding-window layers with rotary, global layers without (NoPE)",
                "logits * logit_scale"),
    ),
    FamilySpec(
        name="olmo2",
        model_types=("olmo2",),
        architectures=("Olmo2ForCausalLM",),
        min_transformers="4.51",
        quirks=("q/k RMSNorm over the whole projection", "norms after attention and MLP"),
    ),
    FamilySpec(
        name="olmo3",
        model_types=("olmo3",),
        architectures=("Olmo3ForCausalLM",),
        min_transformers="4.57",
        rotary_per_layer_type=True,
        rotary_modules_by_layer_type=((SLIDING_LAYER_TYPE, "model.rotary_embs.sliding_attention"),
                                      ("full_attention", "model.rotary_embs.full_attention")),
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        quirks=("OLMo 2 layout", "sliding-window layers", "rope per layer type"),
    ),
    FamilySpec(
        name="stablelm",
        model_types=("stablelm",),
        architectures=("StableLmForCausalLM",),
        min_transformers="4.45",
        embeddings="untied",
        quirks=("StableLM 2 / Zephyr", "partial rotary", "LayerNorm", "optional qkv bias, per-head q/k LayerNorm, "
                "parallel residual"),
    ),
    FamilySpec(
        name="starcoder2",
        model_types=("starcoder2",),
        architectures=("Starcoder2ForCausalLM",),
        min_transformers="4.51",
        sliding_layers=SLIDING_ALL,
        quirks=("LayerNorm with bias", "biased projections", "GELU MLP", "sliding window on every layer"),
    ),
    FamilySpec(
        name="smollm3",
        model_types=("smollm3",),
        architectures=("SmolLM3ForCausalLM",),
        min_transformers="4.57",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        quirks=("NoPE layers (no_rope_layers)", "optional sliding window on upper layers"),
    ),
    FamilySpec(
        name="ministral",
        model_types=("ministral",),
        architectures=("MinistralForCausalLM",),
        min_transformers="4.57",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        quirks=("Ministral 8B", "alternating sliding-window layers"),
    ),
    FamilySpec(
        name="exaone4",
        model_types=("exaone4",),
        architectures=("Exaone4ForCausalLM",),
        min_transformers="4.57",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        quirks=("EXAONE 4.0", "q/k RMSNorm", "norms after attention and MLP",
                "sliding-window layers with rotary, global layers without (NoPE)"),
    ),
    # The 2026 families (issue #14).
    FamilySpec(
        name="glm",
        model_types=("glm",),
        architectures=("GlmForCausalLM",),
        min_transformers="5.24",
        layer_rewrites=("interleaved_rotary",),
        quirks=("GLM-4 (2024, glm-4-9b)", "interleaved partial rotary (static Gather rewrite)", "q/k/v bias"),
    ),
    FamilySpec(
        name="glm4",
        model_types=("glm4",),
        architectures=("Glm4ForCausalLM",),
        min_transformers="5.24",
        layer_rewrites=("interleaved_rotary",),
        quirks=("GLM-4-0414", "interleaved partial rotary (static Gather rewrite)", "norms after attention and MLP",
                "fused gate_up projection"),
    ),
    FamilySpec(
        name="ernie4_5",
        model_types=("ernie4_5",),
        architectures=("Ernie4_5ForCausalLM",),
        min_transformers="5.24",
        layer_rewrites=("interleaved_rotary",),
        quirks=("ERNIE 4.5 dense (0.3B)", "interleaved rotary (static Gather rewrite)", "optional bias everywhere"),
    ),
    FamilySpec(
        name="seed_oss",
        model_types=("seed_oss",),
        architectures=("SeedOssForCausalLM",),
        min_transformers="5.24",
        quirks=("Seed-OSS 36B", "q/k/v bias, o bias optional", "GQA"),
    ),
    FamilySpec(
        name="hunyuan_v1_dense",
        model_types=("hunyuan_v1_dense",),
        architectures=("HunYuanDenseV1ForCausalLM",),
        min_transformers="5.24",
        quirks=("Hunyuan dense (0.5B-7B)", "q/k RMSNorm after rotary", "explicit head_dim"),
    ),
    FamilySpec(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        architectures=("Qwen2MoeForCausalLM",),
        min_transformers="5.24",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        layer_rewrites=("sparse_moe",),
        fused_weights=QWEN_EXPERTS,
        quirks=("Qwen1.5-MoE / Qwen2-57B-A14B", "top-k experts (static: gathered for decode, all weighted for "
                "prefill)", "sigmoid-gated shared expert", "q/k/v bias", "optional dense layers"),
    ),
    FamilySpec(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        architectures=("Qwen3MoeForCausalLM",),
        min_transformers="5.24",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        layer_rewrites=("sparse_moe",),
        fused_weights=QWEN_EXPERTS,
        quirks=("Qwen3-30B-A3B / 235B-A22B", "top-k experts (static: gathered for decode, all weighted for "
                "prefill)", "q/k RMSNorm", "optional dense layers"),
    ),
    FamilySpec(
        name="mixtral",
        model_types=("mixtral",),
        architectures=("MixtralForCausalLM",),
        min_transformers="5.24",
        sliding_layers=SLIDING_ALL,
        layer_rewrites=("sparse_moe",),
        fused_weights=(("mlp.gate.weight", ("block_sparse_moe.gate.weight",)),
                       ("mlp.experts.gate_up_proj", ("block_sparse_moe.experts.{e}.w1.weight",
                                                     "block_sparse_moe.experts.{e}.w3.weight")),
                       ("mlp.experts.down_proj", ("block_sparse_moe.experts.{e}.w2.weight",))),
        embeddings="untied",
        quirks=("Mixtral 8x7B / 8x22B", "top-2 of 8 experts (static: gathered for decode, all weighted for "
                "prefill)", "optional sliding window"),
    ),
    FamilySpec(
        name="gpt_oss",
        model_types=("gpt_oss",),
        architectures=("GptOssForCausalLM",),
        min_transformers="5.24",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        layer_rewrites=("gpt_oss_moe",),
        embeddings="untied",
        quirks=("gpt-oss 20b/120b (dequantized bf16 checkpoints)", "top-k experts with router bias, biased experts, "
                "clamped SwiGLU (static: gathered for decode, all weighted for prefill)", "attention sinks",
                "alternating sliding-window layers", "yarn rope"),
    ),
    FamilySpec(
        name="qwen3_5_text",
        model_types=("qwen3_5_text",),
        architectures=("Qwen3_5ForCausalLM",),
        min_transformers="5.24",
        layer_rewrites=("gated_deltanet",),
        state_layer_type="linear_attention",
        state_kind="gated_deltanet",
        refused_options=GATED_DELTANET_REFUSALS,
        quirks=("Qwen3.5 (text)", "hybrid: gated DeltaNet linear attention with conv + recurrent state segments "
                "(static chunked delta rule), every full_attention_interval-th layer gated full attention",
                "q_proj gives query and sigmoid output gate", "q/k RMSNorm (1 + w)", "partial rotary (mrope, text "
                "positions)", "GQA", "delta rule kept within 4-D tensors (tpu-mlir 1.30 miscomputes 5-D batched "
                "MatMul)", "--naming llm-tpu only"),
    ),
    FamilySpec(
        name="qwen3_5_moe_text",
        # The vision-language checkpoint (Qwen3_5MoeForConditionalGeneration, model_type qwen3_5_moe) is exported as
        # its text model, as transformers' AutoModelForCausalLM loads it: the vision tower is left out.
        model_types=("qwen3_5_moe_text", "qwen3_5_moe"),
        architectures=("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"),
        min_transformers="5.24",
        checkpoint_prefixes=(("model.", "model.language_model."),),
        layer_rewrites=("gated_deltanet", "sparse_moe"),
        fused_weights=QWEN_EXPERTS,
        state_layer_type="linear_attention",
        state_kind="gated_deltanet",
        refused_options=GATED_DELTANET_REFUSALS,
        quirks=("Qwen3.5-MoE (35B-A3B...), text model; of a vision-language checkpoint its language model only "
                "(no vit segment)", "hybrid: gated DeltaNet linear attention with "
                "conv + recurrent state segments (as qwen3_5_text), every full_attention_interval-th layer gated "
                "full attention", "top-k experts, normalised (static: gathered for decode, all weighted for "
                "prefill)", "sigmoid-gated shared expert", "q/k RMSNorm (1 + w)", "partial rotary (mrope, text "
                "positions)", "--naming llm-tpu only"),
    ),
    FamilySpec(
        name="qwen3_next",
        model_types=("qwen3_next",),
        architectures=("Qwen3NextForCausalLM",),
        min_transformers="5.24",
        layer_rewrites=("gated_deltanet", "sparse_moe"),
        fused_weights=QWEN_EXPERTS,
        state_layer_type="linear_attention",
        state_kind="gated_deltanet",
        refused_options=GATED_DELTANET_REFUSALS,
        quirks=("Qwen3-Next (80B-A3B)", "hybrid: gated DeltaNet linear attention with conv + recurrent state "
                "segments, every full_attention_interval-th layer gated full attention", "DeltaNet input "
                "projections fused per key head (qkvz, ba; split with static slices)", "top-k experts (static: "
                "gathered for decode, all weighted for prefill)", "sigmoid-gated shared expert",
                "optional dense layers", "q/k RMSNorm (1 + w)", "partial rotary", "--naming llm-tpu only"),
    ),
    FamilySpec(
        name="lfm2",
        model_types=("lfm2",),
        architectures=("Lfm2ForCausalLM",),
        min_transformers="5.24",
        norm_path="model.embedding_norm",  # LFM2's final norm (applied after the last layer, despite its name)
        layer_rewrites=("short_conv",),
        state_layer_type="conv",
        state_kind="short_conv",
        refused_options=SHORT_CONV_REFUSALS,
        quirks=("LFM2 (350M-2.6B)", "hybrid: gated short-convolution layers with a conv state segment "
                "(B * x through a depthwise causal conv, times C), the other layers full attention",
                "q/k RMSNorm", "GQA", "final norm model.embedding_norm", "--naming llm-tpu only"),
    ),
    FamilySpec(
        name="lfm2_moe",
        model_types=("lfm2_moe",),
        architectures=("Lfm2MoeForCausalLM",),
        min_transformers="5.24",
        norm_path="model.embedding_norm",
        rotary_path="model.pos_emb",
        layer_rewrites=("short_conv", "sparse_moe"),
        fused_weights=(("feed_forward.experts.gate_up_proj", ("feed_forward.experts.{e}.w1.weight",
                                                              "feed_forward.experts.{e}.w3.weight")),
                       ("feed_forward.experts.down_proj", ("feed_forward.experts.{e}.w2.weight",))),
        state_layer_type="conv",
        state_kind="short_conv",
        refused_options=SHORT_CONV_REFUSALS,
        quirks=("LFM2-MoE (8B-A1B)", "LFM2's hybrid layout: short-convolution layers with a conv state segment, "
                "full-attention layers", "first num_dense_layers layers dense, then top-k experts with sigmoid "
                "routing and expert bias (static: gathered for decode, all weighted for prefill)",
                "--naming llm-tpu only"),
    ),
    FamilySpec(
        name="gemma4_text",
        model_types=("gemma4_text",),
        architectures=("Gemma4ForCausalLM",),
        min_transformers="5.24",
        embedding_multiplier="sqrt_hidden",
        final_softcap_attr="final_logit_softcapping",
        rotary_per_layer_type=True,
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        per_layer_embedding=PerLayerEmbedding(
            table_path="model.embed_tokens_per_layer", projection_path="model.per_layer_model_projection",
            norm_path="model.per_layer_projection_norm", width_attr="hidden_size_per_layer_input",
            projection_scale_attr="model.per_layer_model_projection_scale",
            input_scale_attr="model.per_layer_input_scale"),
        kv_sharing=KV_SHARING_BY_MODES,
        per_layer_attention=True,
        # (history_kv, max_input_length: issue 12's prefill on a KV history and shorter prefill nets, whose
        # blocks do not take the shared KV and per-layer embeddings yet; embedding_disk: the host would have
        # to gather the per-layer table too. Fields that do not exist in ExportOptions are never refused.)
        refused_options=(("naming", (None, "llm-tpu"), "the shared-KV and per-layer-embedding inputs of its blocks have names "
                                                      "only in the llm-tpu convention"),
                         ("history_kv", (False,), "its block_kv nets would need the shared-KV and per-layer-embedding "
                                                  "inputs, which they do not take yet"),
                         ("max_input_length", (None,), "prefill nets shorter than SEQ would need the shared-KV and "
                                                       "per-layer-embedding inputs at that length, not made yet"),
                         ("embedding_disk", (False,), "the per-layer embeddings are gathered by the embedding nets; "
                                                      "the host-side gather does not read that table yet")),
        layer_rewrites=("sparse_moe",),  # enable_moe_block: layer.experts beside the dense mlp (none when dense)
        embeddings="tied",
        quirks=("Gemma 4 text (E2B/E4B, 31B; 26B-A4B MoE)", "MoE (enable_moe_block): dense MLP and top-k routed "
                "experts side by side in every layer (static: gathered for decode, all weighted for prefill)",
                "per-layer embeddings (block inputs per_layer_embeds, inputs_embeds)", "last layers reuse an earlier layer's KV (block inputs shared_k/shared_v)",
                "head dim and KV heads per layer type", "proportional partial rope on full layers",
                "attention_k_eq_v", "v_norm", "layer_scalar", "plain RMSNorm (w)", "final logit soft-capping",
                "sliding-window layers"),
    ),
    # Dense decoders of transformers 5.24 that differ from the families above only in what the declarations
    # and transformers' own layer modules already cover.
    FamilySpec(
        name="olmo",
        model_types=("olmo",),
        architectures=("OlmoForCausalLM",),
        min_transformers="5.24",
        quirks=("OLMo 1 (7B, 0424)", "non-parametric LayerNorm", "optional q/k/v clipping (clip_qkv)"),
    ),
    FamilySpec(
        name="arcee",
        model_types=("arcee",),
        architectures=("ArceeForCausalLM",),
        min_transformers="5.24",
        quirks=("Arcee AFM-4.5B", "ReLU^2 MLP without gate", "yarn rope"),
    ),
    FamilySpec(
        name="nemotron",
        model_types=("nemotron",),
        architectures=("NemotronForCausalLM",),
        min_transformers="5.24",
        quirks=("Nemotron-4 / Minitron", "LayerNorm1P (1 + w, with bias)", "ReLU^2 MLP without gate", "partial rotary"),
    ),
    FamilySpec(
        name="jais2",
        model_types=("jais2",),
        architectures=("Jais2ForCausalLM",),
        min_transformers="5.24",
        quirks=("Jais 2", "LayerNorm", "ReLU^2 MLP without gate", "biases everywhere"),
    ),
    FamilySpec(
        name="ministral3",
        model_types=("ministral3",),
        architectures=("Ministral3ForCausalLM",),
        min_transformers="5.24",
        sliding_layers=SLIDING_ALL,
        quirks=("Ministral 3 (text)", "yarn rope", "Llama-4 position-dependent query scaling", "optional sliding window"),
    ),
    FamilySpec(
        name="cwm",
        model_types=("cwm",),
        architectures=("CwmForCausalLM",),
        min_transformers="5.24",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        quirks=("Meta Code World Model", "llama3 rope", "sliding-window layers between full layers"),
    ),
    FamilySpec(
        name="hyperclovax",
        model_types=("hyperclovax",),
        architectures=("HyperCLOVAXForCausalLM",),
        min_transformers="5.24",
        embedding_multiplier="embedding_multiplier",
        logits_multiplier_attr="logits_scaling",
        quirks=("HyperCLOVA X SEED", "muP: embedding/residual/attention multipliers", "logits * logits_scaling"),
    ),
    FamilySpec(
        name="granite_swa",
        model_types=("granite_swa",),
        architectures=("GraniteSWAForCausalLM",),
        min_transformers="5.24",
        embedding_multiplier="embedding_multiplier",
        logits_divisor_attr="logits_scaling",
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        quirks=("Granite with sliding-window layers", "embedding/residual/attention multipliers",
                "logits / logits_scaling"),
    ),
)


# Vision-language families (docs/guides/vision-language.md): a ``vit`` segment beside the language model's.
# transformers' image-text-to-text models keep the language model under model.language_model.
LANGUAGE_MODEL_INSIDE = {
    "auto_class": "AutoModelForImageTextToText",
    "layers_path": "model.language_model.layers",
    "embed_path": "model.language_model.embed_tokens",
    "norm_path": "model.language_model.norm",
    "rotary_path": "model.language_model.rotary_emb",
}
# What every vision family refuses, after its own reasons.
IMAGE_REFUSALS = (
    ("embedding_disk", (False,), "the host merges the vit output into the embedding net's rows; the "
                                 "host-side gather is not wired to images yet"),
    ("naming", (None, "llm-tpu"), "the vit segment's inputs have names only in the llm-tpu convention"),
)
VISION_FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        architectures=("Qwen2_5_VLForConditionalGeneration",),
        min_transformers="5.24",
        **LANGUAGE_MODEL_INSIDE,
        # Qwen's own checkpoints (and transformers' save_pretrained) keep the original layout.
        checkpoint_prefixes=(("model.language_model.", "model."), ("model.visual.", "visual.")),
        mrope=True,
        vision=VisionSpec(kind="qwen2_5_vl", path="model.visual"),
        refused_options=(
            ("max_input_length", (None,), "the image tokens and the prompt are prefilled in one piece (the prefill "
                                          "takes the whole window, SEQ)"),
            *IMAGE_REFUSALS,
        ),
        quirks=("Qwen2.5-VL (3B/7B/32B/72B)", "vit segment: window + full attention, 2x2 patch merger, host-side "
                "window index and masks", "mrope: block position_ids [3, L] (temporal, height, width)",
                "q/k/v bias", "tied (3B) or untied embeddings"),
    ),
    FamilySpec(
        name="qwen3_vl",
        model_types=("qwen3_vl",),
        architectures=("Qwen3VLForConditionalGeneration",),
        min_transformers="5.24",
        **LANGUAGE_MODEL_INSIDE,
        mrope=True,
        mrope_interleaved=True,
        # 256 patches of 16x16, 64 image tokens
        vision=VisionSpec(kind="qwen3_vl", path="model.visual", default_max_pixels=256 * 256),
        refused_options=(
            ("max_input_length", (None,), "the image tokens and the prompt are prefilled in one piece (the prefill "
                                          "takes the whole window, SEQ), the deepstack rows added after the first "
                                          "blocks included"),
            *IMAGE_REFUSALS,
        ),
        quirks=("Qwen3-VL, dense (2B/4B/8B/32B)", "vit segment: full attention, learned position embeddings "
                "interpolated on the host (pos_idx, pos_weight), deepstack features as extra vit outputs, added by "
                "the host after the first blocks", "interleaved mrope: block position_ids [3, L]", "q/k norm",
                "tied or untied embeddings"),
    ),
    FamilySpec(
        name="gemma3_vl",
        model_types=("gemma3",),
        architectures=("Gemma3ForConditionalGeneration",),
        min_transformers="5.24",
        **LANGUAGE_MODEL_INSIDE,
        embedding_multiplier="sqrt_hidden",
        final_softcap_attr="final_logit_softcapping",
        rotary_per_layer_type=True,
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        # transformers' save_pretrained (and Google's checkpoints) keep the original layout.
        checkpoint_prefixes=(("model.language_model.", "language_model.model."),
                             ("model.vision_tower.", "vision_tower."),
                             ("model.multi_modal_projector.", "multi_modal_projector.")),
        vision=VisionSpec(kind="gemma3", path="model.vision_tower", projector_path="model.multi_modal_projector",
                          image_token_attr="image_token_index", vision_start_attr="boi_token_index",
                          vision_end_attr="eoi_token_index", default_max_pixels=0, placeholder="start",
                          bidirectional_image=True),
        refused_options=(
            ("max_input_length", (None,), "the image tokens and the prompt are prefilled in one piece (the prefill "
                                          "takes the whole window, SEQ)"),
            *IMAGE_REFUSALS,
        ),
        embeddings="tied",
        quirks=("Gemma 3 with images (4B/12B/27B)", "vit segment: SigLIP at its fixed image size + projector "
                "(avg-pooled to mm_tokens_per_image, RMSNorm, projection)", "bidirectional attention among the image "
                "tokens in the prefill (host-made mask)", "Gemma 3 text blocks (sliding-window layers, rope per "
                "layer type, embedding scaled by sqrt(hidden))"),
    ),
    FamilySpec(
        name="internvl",
        model_types=("internvl",),
        architectures=("InternVLForConditionalGeneration",),
        min_transformers="5.24",
        **LANGUAGE_MODEL_INSIDE,
        # A Qwen2.5 (or Llama-shaped) language model: sliding windows only where its layer_types say so.
        sliding_layers=SLIDING_BY_LAYER_TYPE,
        # transformers' save_pretrained (and OpenGVLab's -hf checkpoints) keep the llava layout.
        checkpoint_prefixes=(("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                             ("model.vision_tower.", "vision_tower."),
                             ("model.multi_modal_projector.", "multi_modal_projector.")),
        vision=VisionSpec(kind="internvl", path="model.vision_tower", projector_path="model.multi_modal_projector",
                          default_max_pixels=0, bracketed=True, start_token="<img>", end_token="</img>"),
        refused_options=(
            ("history_kv", (False,), "a prefill on top of a KV history does not take the image tiles' rows, which "
                                     "the runtime merges into a whole-window prefill only"),
            ("max_input_length", (None,), "the image tiles' tokens and the prompt are prefilled in one piece (the "
                                          "prefill takes the whole window, SEQ)"),
            *IMAGE_REFUSALS,
        ),
        quirks=("InternVL3 in transformers' layout (-hf checkpoints)", "vit segment: one tile at the config's "
                "image_size (448x448), InternViT + pixel shuffle + MLP projector -> (S/patch)^2 * downsample_ratio^2 "
                "rows", "tiles: the model's own processor (crop_to_patches, max_patches, a thumbnail), each tile "
                "through the vit, <img> <IMG_CONTEXT> x rows x tiles </img>", "Qwen2.5 (or Llama-shaped) blocks, "
                "plain 1-D positions"),
    ),
)
FAMILIES = FAMILIES + VISION_FAMILIES


# Architectures tpugraph knows it cannot export yet, and why: refused naming the reason (exit 4), not a
# silent "unsupported". Each needs segments the contract (CONTRACT.md) and the runtime do not have.
NOT_YET: dict[str, str] = {
}


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES for a in f.architectures)


def family_by_name(name: str) -> FamilySpec:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(name)


def family_for(model_type: str | None, architectures: list[str] | None) -> FamilySpec:
    """The family of a config, or an error naming what was asked and what is supported."""
    for fam in FAMILIES:
        if architectures and any(a in fam.architectures for a in architectures):
            return fam
    for fam in FAMILIES:
        if not architectures and model_type in fam.model_types:
            return fam
    what = ", ".join(architectures) if architectures else f"model_type '{model_type}'"
    known = [a for a in architectures or [] if a in NOT_YET]
    if known:
        raise UnsupportedModelError(f"architecture {known[0]} is not supported yet: {NOT_YET[known[0]]}; "
                                    "`tpugraph families` lists the supported ones")
    import difflib

    near = difflib.get_close_matches(what, supported_architectures(), n=1, cutoff=0.9)
    raise UnsupportedModelError(f"unsupported architecture {what}" + (f" (did you mean {near[0]}?)" if near else "")
                                + "; `tpugraph families` lists the supported ones")
