"""The parts of OUT/manifest.json as typed records: the model, the export options, the conventions, the tools.

Field order is key order in manifest.json; ``optional()`` fields are absent while unset (an option not used).
``manifest.schema.json`` is generated from these records (contract/manifest_schema.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .records import JsonRecord, extra_keys, optional

record = dataclass(kw_only=True)


@record
class SourceRecord(JsonRecord):
    """Where the model came from: a folder, a .gguf file (``path`` is the file itself) or a preset."""

    path: str
    preset: str | None
    random_weights: bool
    gguf_file: str | None = optional()
    extra: dict[str, Any] = extra_keys()


@record
class TokenizerRecord(JsonRecord):
    """OUT/tokenizer/: the files copied from the source (none, and why, when it had no tokenizer)."""

    dir: str | None = optional()
    files: list[str] = field(default_factory=list)
    chat_template: bool | None = optional()
    from_: str | None = optional(key="from")  # "gguf metadata": built from a .gguf file, not copied
    missing: str | None = optional()
    extra: dict[str, Any] = extra_keys()


@record
class LayerKv(JsonRecord):
    """One layer's KV cache: heads and head dim, and the earlier layer whose KV it reads (shared KV)."""

    layer: int
    kv_heads: int
    head_dim: int
    kv_from: int | None
    extra: dict[str, Any] = extra_keys()


@record
class PackedQuantization(JsonRecord):
    """A safetensors source with packed GPTQ/AWQ/AutoRound/compressed-tensors layers (source/quantized.py)."""

    method: str  # gptq | awq | auto-round | compressed-tensors
    packing: str  # gptq | awq-gemm | ct-pack
    bits: int
    group_size: int  # -1: one group over all input features
    sym: bool
    desc_act: bool
    zero_offset: int
    checkpoint_format: str | None
    layers: int
    extra: dict[str, Any] = extra_keys()


@record
class GgufQuantization(JsonRecord):
    """A .gguf source: its tensor types (source/gguf.py)."""

    method: str  # "gguf"
    file: str
    architecture: str | None
    type_counts: dict[str, int]
    tensor_types: dict[str, str]
    extra: dict[str, Any] = extra_keys()


def read_quantization(data: dict[str, Any]) -> PackedQuantization | GgufQuantization:
    return (GgufQuantization if data.get("method") == "gguf" else PackedQuantization).from_json(data)


@record
class VisionRecord(JsonRecord):
    """What the host needs of the vit net (runtime/vision.py): its compiled size and the processor's geometry."""

    kind: str
    max_pixels: int
    patches: int  # P, the vit's compiled number of patches
    patch_dim: int
    tokens: int  # P / spatial_merge_size**2: the image's rows in the language model
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int  # 0: no window attention (Qwen3-VL)
    fullatt_block_indexes: list[int]
    token_ids: dict[str, int]  # image, start, end
    # Qwen3-VL: the learned position table's rows (a square grid the host interpolates), and the vit blocks whose
    # deepstack features the host adds to the image rows after language-model blocks 0, 1, ...
    num_position_embeddings: int | None = optional()
    deepstack_visual_indexes: list[int] | None = optional()
    extra: dict[str, Any] = extra_keys()


@record
class LoraRecord(JsonRecord):
    """A PEFT LoRA adapter (source/lora.py): ``merged`` into the weights (export --lora), or ``inputs``: the block
    nets take each targeted linear's A [R, in] and B [R, out] (scale folded in) as inputs (--lora-max-rank R)."""

    mode: str  # merged | inputs
    path: str | None = optional()  # the adapter merged (mode merged)
    sha256: str | None = optional()  # of its adapter_config.json and adapter_model.safetensors
    rank: int | None = optional()
    alpha: float | None = optional()
    rslora: bool | None = optional()
    targets: list[str] = field(default_factory=list)  # the linears (their names inside a block)
    modules: int | None = optional()  # targeted linears in all
    modules_to_save: list[str] | None = optional()
    max_rank: int | None = optional()  # R of the LoRA inputs (mode inputs)
    extra: dict[str, Any] = extra_keys()


@record
class ModelFacts(JsonRecord):
    """What the exporter needs to know about a model, read from its config (source/checkpoint.py model_facts)."""

    architecture: str
    model_type: str
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # layer 0's when layers differ (layers_kv has each layer's)
    vocab_size: int
    max_positions: int
    tie_word_embeddings: bool
    rope: dict[str, Any] = field(default_factory=dict)
    bos_token_id: Any = None
    eos_token_id: Any = None  # an int or a list of ints
    dtype: str | None = None
    extra: dict[str, Any] = extra_keys()


@record
class ModelRecord(ModelFacts):
    """manifest.model: the facts, the per-layer records the runtime drives by, the source and its tokenizer."""

    state_layers: list[int] | None = optional()  # hybrid models: layers carrying a state instead of a KV cache
    state_shapes: dict[str, list[int]] | None = optional()
    layers_kv: list[LayerKv] | None = optional()  # when layers differ (per-layer KV shapes, shared KV)
    per_layer_embedding: int | None = optional()  # P of the per-layer embeddings (with layers_kv)
    mrope_section: list[int] | None = optional()  # multimodal rotary: the blocks take position_ids [3, L]
    vision: VisionRecord | None = optional()  # vision-language models: what the host does around the vit
    source: SourceRecord
    source_quantization: PackedQuantization | GgufQuantization | None = optional()
    tokenizer: TokenizerRecord | None = optional()  # set once every segment is written
    lora: LoraRecord | None = optional()  # a LoRA adapter merged in, or the blocks' LoRA inputs

    union_readers = {"source_quantization": read_quantization}

    @property
    def eos_ids(self) -> set[int]:
        """eos_token_id as a set (the config may give one id, a list, or none)."""
        ids = self.eos_token_id
        if ids is None:
            return set()
        return {int(i) for i in ids} if isinstance(ids, (list, tuple)) else {int(ids)}


@record
class RecordedOptions(JsonRecord):
    """manifest.options: the export options the segments depend on. The runtime options are recorded only
    when they differ from the default, so a default export's manifest keeps its keys."""

    seq_length: int
    dtype: str  # the weights' float type: float32 | float16 | bfloat16
    int_dtype: str
    # Recorded since later versions of format 1: an older manifest reads as the defaults.
    external_data: str = "auto"
    penalty_head: bool = False
    greedy_in_lm_head: bool = False
    sample_head: str | None = None
    lm_head_topk: bool = False
    embedding_disk: bool = False
    max_input_length: int | None = optional()  # L, when it is not SEQ
    history_kv: bool = optional(False)
    max_pixels: int | None = optional()  # vision-language models: the vit's compiled image size
    num_device: int = optional(1)  # > 1: blocks written for tpu-mlir's device-parallel split
    extra: dict[str, Any] = extra_keys()

    @property
    def input_length(self) -> int:
        """L: tokens of one prefill (SEQ unless --max-input-length set it)."""
        return self.seq_length if self.max_input_length is None else self.max_input_length


@record
class EmbeddingTableRecord(JsonRecord):
    """--embedding-disk: OUT's float32 vocabulary rows, which the host gathers instead of an embedding net."""

    file: str
    shape: list[int]  # [vocab, hidden]
    dtype: str
    size: int
    sha256: str
    extra: dict[str, Any] = extra_keys()


@record
class Conventions(JsonRecord):
    """manifest.conventions: how the segments' inputs and outputs are laid out and named."""

    kv_layout: str
    mask_value: float
    opset: int
    naming: str  # llm-tpu | optimum | genie
    int_dtype: str
    float_dtype: str
    batch: int
    embedding_disk: EmbeddingTableRecord | None = optional()
    extra: dict[str, Any] = extra_keys()


@record
class ToolVersions(JsonRecord):
    """manifest.tools: the versions that made the export (onnxsim may be "not installed")."""

    tpugraph: str
    torch: str
    transformers: str
    onnx: str
    onnxsim: str | None = optional()  # "not installed" when it is not
    extra: dict[str, Any] = extra_keys()


@record
class PassChainEntry(JsonRecord):
    """One configured pass of the resolved chain."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = extra_keys()


@record
class ExternalDataFile(JsonRecord):
    """A weights file beside a segment (shared by the segments of one work unit)."""

    file: str
    size: int | None = optional()
    sha256: str | None = optional()
    extra: dict[str, Any] = extra_keys()


@record
class TestDataRecord(JsonRecord):
    """OUT/test_data/<segment>_input.npz: realistic inputs of the segment, and how they were made."""

    __test__ = False  # not a pytest class
    file: str
    prefill_tokens: int | None = None
    decode_position: int | None = None
    seed: int | None = None
    extra: dict[str, Any] = extra_keys()


@record
class ExportStats(JsonRecord):
    """manifest.stats: how the run went (absent when every segment was kept from an earlier run)."""

    segments_traced: int | None = optional()
    segments_weight_swapped: int | None = optional()
    extra: dict[str, Any] = extra_keys()
