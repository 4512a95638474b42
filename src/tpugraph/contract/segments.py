"""The segment contract of ../shared/CONTRACT.md as data: names, input order, static shapes, dtypes.

Why this module is long: it is the contract itself, every net's inputs and outputs in one place (the language
model's, the heads', the eval head's and each vision family's vit), beside the host-side inputs (prefill, decode,
history masks) that must agree with them. Splitting it would put one contract in several files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .manifest_records import LayerKv
from .records import TextEnum

MASK_VALUE = -10000.0
KV_LAYOUT = "sequence-major [1, SEQ, KVH, D]"


class SegmentKind(TextEnum):
    VIT = "vit"
    EMBEDDING = "embedding"
    EMBEDDING_CACHE = "embedding_cache"
    BLOCK = "block"
    BLOCK_KV = "block_kv"
    BLOCK_CACHE = "block_cache"
    LM_HEAD = "lm_head"
    GREEDY_HEAD = "greedy_head"
    PENALTY_SAMPLE_HEAD = "penalty_sample_head"
    SAMPLE_HEAD = "sample_head"


SAMPLE_HEADS = ("current", "legacy")  # sample_head (CONTRACT.md second table) | penalty_sample_head (first)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: float32, int32, int64

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])

    @staticmethod
    def json_schema() -> dict[str, Any]:
        return {"description": "A graph input or output: its name, static shape and numpy dtype name.",
                "type": "object", "required": ["name", "shape", "dtype"],
                "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                               "dtype": {"type": "string"}}}

    @classmethod
    def from_value_info(cls, v, dynamic: list[str] | None = None) -> "TensorSpec":
        """The spec of an ONNX ValueInfoProto; each symbolic or unknown dim is -1 and noted in ``dynamic``."""
        import onnx

        tt = v.type.tensor_type
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                if dynamic is not None:
                    dynamic.append(f"{v.name}[{i}]={d.dim_param or '?'}")
                dims.append(-1)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "undefined"
        return cls(v.name, tuple(dims), dtype)


@dataclass(frozen=True)
class SegmentSpec:
    name: str
    kind: SegmentKind
    layer: int | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # The variant, as fields (what exports and reads the segment asks these, not its I/O names):
    per_layer: bool = False  # per-layer embeddings: an embedding's second output, a block's two extra inputs
    shared_kv: bool = False  # a block attending over an earlier layer's KV (shared_k/shared_v in, no KV out)
    greedy_token: bool = False  # an lm_head that takes the top-1 itself: ``token`` [1,1] its first output
    logits: bool = True  # an lm_head that outputs ``m_logits`` (not the top-k lm_head)
    lora_linears: tuple[str, ...] = ()  # a block net's LoRA inputs: these linears' A and B follow its other inputs

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in (*self.inputs, *self.outputs)}


@dataclass(frozen=True)
class VisionDims:
    """The ``vit`` segment's static sizes (docs/guides/vision-language.md): ``patches`` P = max_pixels /
    patch_size^2 patchified pixels of ``patch_dim`` = channels x temporal_patch_size x patch_size^2 each, merged
    ``merge_unit`` (spatial_merge_size^2) at a time into P / merge_unit rows of the language model's hidden size."""

    patches: int
    patch_dim: int
    merge_unit: int
    max_pixels: int
    kind: str = "qwen2_5_vl"  # VisionSpec.kind: which inputs the vit takes (vit_spec)
    deepstack: int = 0  # Qwen3-VL: the deepstack feature outputs beside vit_embeds, one per early block

    @property
    def tokens(self) -> int:
        return self.patches // self.merge_unit


@dataclass(frozen=True)
class ContractDims:
    """The symbols of the contract for one model and one export."""

    seq: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    int_dtype: str = "int32"
    float_dtype: str = "float32"
    sample_top_k: int = 50
    max_input: int | None = None  # L: tokens of one prefill (embedding, block_i, block_kv_i); None = SEQ

    @property
    def input_length(self) -> int:
        return self.seq if self.max_input is None else self.max_input
    # Layers that carry a state instead of a KV cache (hybrid models, export/linear_attention.py), and the
    # shapes of their states by input name (e.g. conv_state, recurrent_state). Empty for the other models.
    state_layers: tuple[int, ...] = ()
    state_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # Per layer (KVH, D) when layers differ (Gemma 4: sliding and full layers); empty = (kv_heads, head_dim).
    layer_kv: tuple[tuple[int, int], ...] = ()
    # Per layer: the earlier layer whose KV it attends over (shared KV), or None; empty = none shared.
    kv_from: tuple[int | None, ...] = ()
    # Width P of the per-layer embeddings (Gemma 4), 0 = none.
    per_layer: int = 0
    # Rows of the blocks' position_ids: 1, or 3 for multimodal rotary (mrope: [3, L]).
    position_rows: int = 1
    # The vit segment's sizes (vision-language models), or None.
    vision: VisionDims | None = None
    # --lora-max-rank R: each block net also takes, per linear of the layer (its path inside the layer, in
    # features, out features), that linear's LoRA A [R, in] and B [R, out] (source/lora.py).
    lora_rank: int = 0
    lora_linears: tuple[tuple[str, int, int], ...] = ()

    def lora_inputs(self) -> tuple[TensorSpec, ...]:
        """The block nets' LoRA inputs (none without --lora-max-rank), after the contract's own inputs."""
        if not self.lora_rank:
            return ()
        out: list[TensorSpec] = []
        for path, fan_in, fan_out in self.lora_linears:
            out += [TensorSpec(f"{path}.lora_A", (self.lora_rank, fan_in), self.float_dtype),
                    TensorSpec(f"{path}.lora_B", (self.lora_rank, fan_out), self.float_dtype)]
        return tuple(out)

    def kv_shape(self, layer: int) -> tuple[int, int]:
        return self.layer_kv[layer] if self.layer_kv else (self.kv_heads, self.head_dim)

    def kv_source(self, layer: int) -> int | None:
        return self.kv_from[layer] if self.kv_from else None

    def layer_records(self) -> list[LayerKv]:
        """The manifest's per-layer KV record (model.layers_kv): what the runtime allocates and feeds."""
        return [LayerKv(layer=i, kv_heads=self.kv_shape(i)[0], head_dim=self.kv_shape(i)[1],
                        kv_from=self.kv_source(i)) for i in range(self.layers)]


def segment_specs(d: ContractDims, with_penalty_head: bool = False, greedy_in_lm_head: bool = False,
                  sample_head: str | None = None, lm_head_topk: bool = False,
                  embedding_disk: bool = False, history_kv: bool = False) -> list[SegmentSpec]:
    """Every segment of the default output, in the order the runtime first uses them.

    ``sample_head``: "current" adds ``sample_head`` (CONTRACT.md, second table), "legacy" the first table's
    ``penalty_sample_head`` (as ``with_penalty_head`` does). ``lm_head_topk``: the current runtime's top-k
    lm_head, ``token`` [1,1] int its only output, and no ``greedy_head``. ``embedding_disk``: no embedding
    nets (the runtime gathers rows of the vocabulary matrix on the host).

    The prefill nets (``embedding``, ``block_i``, ``block_kv_i``) take L = ``d.input_length`` tokens (SEQ by
    default); the decode nets keep SEQ. ``history_kv`` adds ``block_kv_i`` (CONTRACT.md, second table): a
    prefill of up to L new tokens on top of the KV history, for multi-turn chat and chunked prefill.

    ``greedy_in_lm_head``: the seed recipe's variant, one net fewer. ``lm_head`` takes the top-1 itself
    and outputs ``token`` [1,1] int first and ``m_logits`` [1,V] second (a runtime reading output 0 as
    the next token works unchanged; logits stay available for sampling and verification), and there is
    no ``greedy_head``.
    """
    f, i = d.float_dtype, d.int_dtype
    n = d.input_length
    T = TensorSpec

    def per_layer_out(s: int) -> tuple[TensorSpec, ...]:
        return (T("per_layer_embeds", (1, s, d.layers, d.per_layer), f),) if d.per_layer else ()

    def per_layer_in(s: int) -> tuple[TensorSpec, ...]:
        return ((T("per_layer_embeds", (1, s, d.per_layer), f), T("inputs_embeds", (1, s, d.hidden), f))
                if d.per_layer else ())

    specs = [vit_spec(d)] if d.vision is not None else []
    specs += [] if embedding_disk else [
        SegmentSpec("embedding", SegmentKind.EMBEDDING, None,
                    (T("input_ids", (1, n), i),), (T("input_embed", (1, n, d.hidden), f), *per_layer_out(n)),
                    per_layer=bool(d.per_layer)),
        SegmentSpec("embedding_cache", SegmentKind.EMBEDDING_CACHE, None,
                    (T("input_ids", (1, 1), i),), (T("input_embed", (1, 1, d.hidden), f), *per_layer_out(1)),
                    per_layer=bool(d.per_layer)),
    ]
    lora = d.lora_inputs()
    lora_paths = tuple(path for path, _, _ in d.lora_linears) if d.lora_rank else ()
    states = tuple(T(name, shape, f) for name, shape in d.state_shapes)
    next_states = tuple(T(f"next_{t.name}", t.shape, f) for t in states)
    for layer in range(d.layers):
        kv_hist = (1, d.seq, *d.kv_shape(layer))
        kv_one = (1, 1, *d.kv_shape(layer))
        kv_new = (1, n, *d.kv_shape(layer))
        if layer in d.state_layers:
            # README "State segments": the prefill starts from a zero state and reads only the mask's diagonal
            # (which rows are prompt tokens); the decode step takes the states and returns the next ones.
            specs.append(SegmentSpec(
                f"block_{layer}", SegmentKind.BLOCK, layer,
                (T("input_states", (1, d.seq, d.hidden), f), T("attention_mask", (1, 1, d.seq, d.seq), f)),
                (T("hidden_states", (1, d.seq, d.hidden), f), *next_states),
            ))
            specs.append(SegmentSpec(
                f"block_cache_{layer}", SegmentKind.BLOCK_CACHE, layer,
                (T("input_states", (1, 1, d.hidden), f), *states),
                (T("hidden_states", (1, 1, d.hidden), f), *next_states),
            ))
            continue
        shared = d.kv_source(layer) is not None
        if not shared:
            prefill_kv_in, prefill_kv_out = (), (T("past_k", kv_new, f), T("past_v", kv_new, f))
            decode_kv_in = (T("history_k", kv_hist, f), T("history_v", kv_hist, f))
            decode_kv_out = (T("past_k", kv_one, f), T("past_v", kv_one, f))
        else:  # shared KV (CONTRACT: tpu-mlir's Gemma 4 blocks): the owner layer's K/V in, no K/V out
            kv_all = (1, d.seq + 1, *d.kv_shape(layer))
            prefill_kv_in, prefill_kv_out = (T("shared_k", kv_new, f), T("shared_v", kv_new, f)), ()
            decode_kv_in, decode_kv_out = (T("shared_k", kv_all, f), T("shared_v", kv_all, f)), ()
        specs.append(SegmentSpec(
            f"block_{layer}", SegmentKind.BLOCK, layer,
            (T("input_states", (1, n, d.hidden), f), T("position_ids", (d.position_rows, n), i),
             T("attention_mask", (1, 1, n, n), f), *per_layer_in(n), *prefill_kv_in, *lora),
            (T("hidden_states", (1, n, d.hidden), f), *prefill_kv_out), per_layer=bool(d.per_layer), shared_kv=shared,
            lora_linears=lora_paths,
        ))
        if history_kv:
            specs.append(SegmentSpec(
                f"block_kv_{layer}", SegmentKind.BLOCK_KV, layer,
                (T("input_states", (1, n, d.hidden), f), T("position_ids", (d.position_rows, n), i),
                 T("attention_mask", (1, 1, n, d.seq + n), f), T("history_k", kv_hist, f),
                 T("history_v", kv_hist, f), *lora),
                (T("hidden_states", (1, n, d.hidden), f), T("past_k", kv_new, f), T("past_v", kv_new, f)),
                lora_linears=lora_paths,
            ))
        specs.append(SegmentSpec(
            f"block_cache_{layer}", SegmentKind.BLOCK_CACHE, layer,
            (T("input_states", (1, 1, d.hidden), f), T("position_ids", (d.position_rows, 1), i),
             T("attention_mask", (1, 1, 1, d.seq + 1), f), *per_layer_in(1), *decode_kv_in, *lora),
            (T("hidden_states", (1, 1, d.hidden), f), *decode_kv_out), per_layer=bool(d.per_layer), shared_kv=shared,
            lora_linears=lora_paths,
        ))
    if lm_head_topk:
        specs.append(SegmentSpec("lm_head", SegmentKind.LM_HEAD, None, (T("hidden_states", (1, d.hidden), f),),
                                 (T("token", (1, 1), i),), greedy_token=True, logits=False))
    elif greedy_in_lm_head:
        specs.append(SegmentSpec("lm_head", SegmentKind.LM_HEAD, None, (T("hidden_states", (1, d.hidden), f),),
                                 (T("token", (1, 1), i), T("m_logits", (1, d.vocab), f)), greedy_token=True))
    else:
        specs.append(SegmentSpec("lm_head", SegmentKind.LM_HEAD, None,
                                 (T("hidden_states", (1, d.hidden), f),), (T("m_logits", (1, d.vocab), f),)))
        specs.append(SegmentSpec("greedy_head", SegmentKind.GREEDY_HEAD, None,
                                 (T("m_logits", (1, d.vocab), f),), (T("token", (1, 1), i),)))
    if sample_head == "current":
        k = d.sample_top_k
        specs.append(SegmentSpec(
            "sample_head", SegmentKind.SAMPLE_HEAD, None,
            (T("m_logits", (1, d.vocab), f), T("input_ids", (1, d.seq), i), T("penalty", (1,), f),
             T("temperature", (1,), f), T("top_k", (1,), i), T("top_p", (1,), f)),
            (T("probs", (1, k), f), T("token_idx", (1, k), i)),
        ))
    if with_penalty_head or sample_head == "legacy":
        k = d.sample_top_k
        specs.append(SegmentSpec(
            "penalty_sample_head", SegmentKind.PENALTY_SAMPLE_HEAD, None,
            (T("m_logits", (1, d.vocab), f), T("input_ids", (1, d.seq), i), T("top_p", (1,), f),
             T("temperature", (1,), f), T("penalty", (1,), f)),
            (T("probs", (1, k), f), T("token", (1, k), i)),
        ))
    return specs


EVAL_HEAD = "lm_head_all"


def eval_head_spec(rows: int, hidden: int, vocab: int, float_dtype: str = "float32") -> SegmentSpec:
    """``lm_head_all``, the evaluation's head (tpugraph eval, compile --eval-head): lm_head over the ``rows`` = L
    hidden states of a prefill at once, hidden_states [L, H] -> m_logits [L, V]. Not a segment of OUT (no runtime
    uses it): it is derived from OUT's lm_head (export/eval_head.py) for scoring every position of a window."""
    return SegmentSpec(EVAL_HEAD, SegmentKind.LM_HEAD, None, (TensorSpec("hidden_states", (rows, hidden), float_dtype),),
                       (TensorSpec("m_logits", (rows, vocab), float_dtype),))


def vit_spec(d: ContractDims) -> SegmentSpec:
    """The vision encoder + merger (tpu-mlir llm_convert's Qwen2.5-VL ``vit`` net): patchified pixels in window
    order, their (h, w) rotary positions, the full and window attention masks, and the index that puts the merged
    rows back in image order -> the image's embedding rows [P / merge_unit, H]."""
    v, f, i, T = d.vision, d.float_dtype, d.int_dtype, TensorSpec
    p = v.patches
    if v.kind == "qwen3_vl":
        return qwen3_vit_spec(d)
    if v.kind in ("gemma3", "internvl"):  # one fixed-size image (InternVL: one tile) per run
        return gemma3_vit_spec(d)
    return SegmentSpec("vit", SegmentKind.VIT, None,
                       (T("pixel_values", (p, v.patch_dim), f), T("position_ids", (p, 2), i),
                        T("full_attn_mask", (1, 1, p, p), f), T("window_attn_mask", (1, 1, p, p), f),
                        T("reverse_index", (v.tokens,), i)),
                       (T("vit_embeds", (v.tokens, d.hidden), f),))


# Bilinear interpolation of a learned position table: each patch reads 4 of its rows (Qwen3-VL's pos_idx/pos_weight).
POSITION_TAPS = 4


def qwen3_vit_spec(d: ContractDims) -> SegmentSpec:
    """Qwen3-VL's vision encoder + mergers (llm_convert's Qwen3-VL ``vit`` net): patchified pixels in the
    processor's order, their (h, w) rotary positions, the 4 rows of the learned position table each patch
    interpolates and their weights, and the attention mask (0 within the image, MASK elsewhere) -> the image's
    embedding rows and one deepstack feature per early language-model block, each [P / merge_unit, H]."""
    v, f, i, T = d.vision, d.float_dtype, d.int_dtype, TensorSpec
    p = v.patches
    rows = (v.tokens, d.hidden)
    return SegmentSpec("vit", SegmentKind.VIT, None,
                       (T("pixel_values", (p, v.patch_dim), f), T("position_ids", (p, 2), i),
                        T("pos_idx", (p, POSITION_TAPS), i), T("pos_weight", (p, POSITION_TAPS, 1), f),
                        T("attention_mask", (1, 1, p, p), f)),
                       (T("vit_embeds", rows, f), *(T(f"deepstack_{k}", rows, f) for k in range(v.deepstack))))


def gemma3_vit_spec(d: ContractDims) -> SegmentSpec:
    """Gemma 3's SigLIP vision tower at its fixed image size + the multimodal projector: the processor's image
    [1, 3, S, S] -> its mm_tokens_per_image embedding rows [P / merge_unit, H] (P = (S / patch)^2 patches,
    average-pooled merge_unit at a time). InternVL's vit has the same contract for one tile (llm_convert's
    InternVL3 vit): InternViT, the pixel shuffle (merge_unit patches per row) and the MLP projector."""
    v, f, T = d.vision, d.float_dtype, TensorSpec
    side = int(round((v.max_pixels) ** 0.5))
    return SegmentSpec("vit", SegmentKind.VIT, None, (T("pixel_values", (1, 3, side, side), f),),
                       (T("vit_embeds", (v.tokens, d.hidden), f),))


# The mask value as LLM-TPU's demos write it: a raw 16-bit pattern (CONTRACT.md, second table).
MASK_PATTERNS = {"f16": 0xF0E2, "bf16": 0xC61C}


def mask_value_as_read(pattern: int, net_dtype: str) -> float:
    """The value a net whose float inputs are ``net_dtype`` (f32, f16, bf16) reads from the 16-bit ``pattern``.

    An F32 net gets the F16 value itself (the runtimes convert); 0xF0E2 read as BF16 is about -5.5e29."""
    import numpy as np

    if net_dtype == "bf16":
        return float(np.array([pattern << 16], dtype=np.uint32).view(np.float32)[0])
    return float(np.array([pattern], dtype=np.uint16).view(np.float16)[0])


def prefill_inputs(prompt: list[int], seq: int, mask_value: float = MASK_VALUE):
    """input_ids, position_ids, attention_mask of the prefill step, as the runtime builds them.

    ``seq`` is the prefill nets' input length (L, which is SEQ unless --max-input-length set it)."""
    import numpy as np

    n = len(prompt)
    ids = np.zeros((1, seq), dtype=np.int64)
    ids[0, :n] = prompt
    pos = np.zeros((1, seq), dtype=np.int64)
    pos[0, :n] = np.arange(n)
    mask = np.full((1, 1, seq, seq), mask_value, dtype=np.float32)
    for r in range(n):
        mask[0, 0, r, : r + 1] = 0.0
    return ids, pos, mask


def decode_inputs(token: int, n: int, seq: int, mask_value: float = MASK_VALUE):
    """input_ids, position_ids, attention_mask of the decode step for the token at index ``n``."""
    import numpy as np

    ids = np.array([[token]], dtype=np.int64)
    pos = np.array([[n]], dtype=np.int64)
    mask = np.full((1, 1, 1, seq + 1), mask_value, dtype=np.float32)
    mask[0, 0, 0, :n] = 0.0
    mask[0, 0, 0, seq] = 0.0
    return ids, pos, mask


def history_prefill_inputs(chunk: list[int], history: int, length: int, seq: int, mask_value: float = MASK_VALUE):
    """input_ids, position_ids, attention_mask of a ``block_kv_i`` prefill (CONTRACT.md, second table): the
    ``n = len(chunk)`` new tokens at positions ``history..history+n-1`` on top of ``history`` cached tokens.

    Mask row r < n sees history columns c < ``history`` and new-token columns SEQ + j for j <= r; rows past
    n see nothing new but are harmless (their outputs are garbage by contract)."""
    import numpy as np

    n = len(chunk)
    if not 1 <= n <= length:
        raise ValueError(f"a history prefill takes 1..{length} tokens (got {n})")
    if history + n > seq:
        raise ValueError(f"{history} cached + {n} new tokens exceed SEQ={seq}")
    ids = np.zeros((1, length), dtype=np.int64)
    ids[0, :n] = chunk
    pos = np.zeros((1, length), dtype=np.int64)
    pos[0, :n] = np.arange(history, history + n)
    mask = np.full((1, 1, length, seq + length), mask_value, dtype=np.float32)
    for r in range(n):
        mask[0, 0, r, :history] = 0.0
        mask[0, 0, r, seq: seq + r + 1] = 0.0
    return ids, pos, mask
