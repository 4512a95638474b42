"""What a compile may be asked for: chips, quantization modes, devices, and the validation of a request."""

from __future__ import annotations

from dataclasses import dataclass

from ..contract.segments import SegmentKind
from ..errors import UsageError
from .chips import ALL_MODES, CHIPS, chip_spec

QUANTIZE_MODES = ALL_MODES
# auto: the weight-only mode matching a quantized source (quant_fidelity.choose_compile_mode), else f16.
AUTO = "auto"
DEFAULT_FLOAT_MODE = "f16"
NUM_DEVICES = (1, 2, 4, 8)
DEFAULT_Q_GROUP_SIZE = 64  # LLM-TPU's choice for the 4-bit modes

# Quantization of each segment kind. The embedding is a lookup table: weight-only modes do not apply, it
# keeps the activation float type of the mode. The heads are tiny and need exact arithmetic: F32.
HEAD_KINDS = (SegmentKind.GREEDY_HEAD, SegmentKind.PENALTY_SAMPLE_HEAD, SegmentKind.SAMPLE_HEAD)
# --quant_input / --quant_output strip the f32<->f16 casts at a net's edges, so the runtime moves the
# activations between nets in the quantized type: every net that receives an activation from another net
# strips its input cast, every net whose output goes on to another net strips its output cast. lm_head
# keeps an f32 output because the heads (F32) take its logits. On int inputs and on the F32 heads there is
# no cast to strip: the flag changes nothing there (checked with tpu-mlir 1.30.2) and is kept as CONTRACT.md
# lists it.
_STREAM_KINDS = (SegmentKind.EMBEDDING, SegmentKind.EMBEDDING_CACHE, SegmentKind.BLOCK, SegmentKind.BLOCK_KV,
                 SegmentKind.BLOCK_CACHE)
QUANT_INPUT_KINDS = (*_STREAM_KINDS, SegmentKind.LM_HEAD, *HEAD_KINDS)
# (the vit's rows go on into the embedding stream: --quant_output; the host hands it float32 pixels: no --quant_input)
QUANT_OUTPUT_KINDS = (*_STREAM_KINDS, SegmentKind.VIT)
# The decode blocks read their KV history from buffers the runtime keeps across steps.
# sample_head as llm_convert deploys it (CONTRACT.md, second table): io_alone and --dynamic, since the
# runtime may hand it fewer recent tokens than SEQ for the repetition penalty.
IO_ALONE_KINDS = (SegmentKind.BLOCK_CACHE, SegmentKind.SAMPLE_HEAD)
DYNAMIC_KINDS = (SegmentKind.SAMPLE_HEAD,)
# compile --dynamic: the prefill nets too, so the runtime runs them at the prompt's (chunk's) length
# (llm_convert's --dynamic; their Reshapes get a free sequence axis in the transform, tpu_mlir_transform.py).
DYNAMIC_PREFILL_KINDS = (SegmentKind.BLOCK, SegmentKind.BLOCK_KV)
# The vision encoder (a vision-language output's vit) as llm_convert deploys it (LlmConverter.compile_vit): in the
# mode's float type whatever the language model's weights (a W4/W8 mode keeps it F16/BF16), --quant_output (above),
# and --high_precision, which llm_convert gives every net and tpugraph the vit only: tpu-mlir keeps some ops
# (norms, softmax) in F32, and a vision tower's activations are far larger than a language model's.
FLOAT_KINDS = (SegmentKind.EMBEDDING, SegmentKind.EMBEDDING_CACHE, SegmentKind.VIT)
HIGH_PRECISION_KINDS = (SegmentKind.VIT,)
CHECK_MODES = ("representative", "all", "none")


@dataclass(frozen=True)
class CompileOptions:
    chip: str = "bm1684x"
    quantize: str = AUTO  # resolved against OUT's manifest by resolve_auto before planning
    q_group_size: int | None = None  # None: 64 (model_deploy's default for the W4 and W8 modes; weight_cost.py)
    q_symmetric: bool = False  # model_deploy --q_symmetric (chosen by auto for checkpoints it fits better)
    num_device: int = 1
    # TPU cores of one chip each net is compiled for (model_deploy --num_core; at most the chip's, chips.CHIP_TABLE)
    num_core: int = 1
    # representative: the tools' compares on one segment per distinct structure (with test data), then an
    # end-to-end greedy check of the combined bmodel on the cmodel; all: the compares on every segment; none.
    check: str = "representative"
    # rotary embedding and attention handed to the backend as top.Rope / top.FAttention (tpu_mlir_transform.py)
    fuse: bool = True
    # a tied vocabulary matrix stored once in the combined bmodel (vocab_sharing.py: the final norm moves into the
    # last layer's nets for tpu-mlir); False keeps the contract's cut (lm_head applies the final norm) there too
    share_vocab: bool = True
    # the prefill nets (block_i, block_kv_i) compiled --dynamic: run at the real prompt length (forward_dynamic)
    dynamic: bool = False
    # also compile lm_head_all (compiler/eval_head.py), the evaluation's head over every position of a prefill, for
    # tpugraph eval --bmodel; a net no runtime uses, so only when asked (the bmodel's name ends in _eval)
    eval_head: bool = False
    # the device memory the model must fit in (bytes); None: the chip's (chips.CHIP_TABLE). A board with more or
    # less memory than the chip's common one; the compile refuses a model the memory plan puts above it.
    device_memory: int | None = None

    def check_options(self) -> "CompileOptions":
        """Validate and normalise (lowercase names, the default group size); raises UsageError."""
        chip, quantize = self.chip.lower(), self.quantize.lower()
        spec = chip_spec(chip)
        if quantize not in QUANTIZE_MODES + (AUTO,):
            raise UsageError(f"quantization must be one of {', '.join(QUANTIZE_MODES + (AUTO,))} (got '{self.quantize}')")
        if quantize != AUTO and quantize not in spec.quantize_modes:
            raise UsageError(f"quantization {quantize} is not supported on {chip} "
                             f"(it takes {', '.join(spec.quantize_modes)})")
        group = self.q_group_size
        if group is not None:
            if not quantize.startswith("w") and quantize != AUTO:
                raise UsageError(f"a group size applies to the weight-only modes (w8*/w4*), not to {quantize}")
            if group < 1:
                raise UsageError(f"the group size must be a positive number (got {group})")
        elif quantize.startswith("w4"):
            group = DEFAULT_Q_GROUP_SIZE  # auto keeps None: the checkpoint's own group size is chosen later
        if self.num_device not in NUM_DEVICES:
            raise UsageError(f"the device count must be one of {', '.join(map(str, NUM_DEVICES))} (got {self.num_device})")
        if self.num_device > spec.max_devices:
            multi = ", ".join(c for c in CHIPS if chip_spec(c).max_devices > 1)
            raise UsageError(f"a device count > {spec.max_devices} needs {multi}: {chip} {spec.single_device_reason}")
        if not 1 <= self.num_core <= spec.cores:
            raise UsageError(f"the core count must be 1 to {spec.cores} on {chip}, which has {spec.cores} TPU "
                             f"core{'s' if spec.cores > 1 else ''} (got {self.num_core})")
        if self.device_memory is not None and self.device_memory <= 0:
            raise UsageError(f"the device memory must be a positive number of bytes (got {self.device_memory})")
        check = {True: "representative", False: "none"}.get(self.check, self.check)  # type: ignore[arg-type]
        if check not in CHECK_MODES:
            raise UsageError(f"check must be one of {', '.join(CHECK_MODES)} (got '{self.check}')")
        return CompileOptions(chip=chip, quantize=quantize, q_group_size=group, num_device=self.num_device,
                              num_core=self.num_core, check=check, q_symmetric=self.q_symmetric and quantize.startswith("w"), fuse=self.fuse,
                              share_vocab=self.share_vocab, dynamic=bool(self.dynamic), eval_head=bool(self.eval_head),
                              device_memory=self.device_memory)

    @property
    def chip_spec(self):
        """The chip's entry of chips.CHIP_TABLE."""
        return chip_spec(self.chip)

    @property
    def tag(self) -> str:
        return (f"{self.quantize}_{self.chip}_{self.num_device}dev" + (f"_{self.num_core}core" if self.num_core > 1 else "")
                + ("_dynamic" if self.dynamic else "")
                + ("_eval" if self.eval_head else ""))




def resolve_auto(options: CompileOptions, out_dir, manifest):
    """``quantize='auto'``: the weight-only mode, group size and symmetry that keep a quantized source's integers
    best (with the measured fidelity), or the default float mode for a float source. Returns the options with
    a concrete mode and the quant_fidelity.CompileChoice (None for a float source or an explicit mode)."""
    from dataclasses import replace

    if options.quantize.lower() != AUTO:
        return options, None
    if not manifest.model.source_quantization:
        return replace(options, quantize=DEFAULT_FLOAT_MODE), None
    from .quant_fidelity import choose_compile_mode

    choice = choose_compile_mode(out_dir)
    group = options.q_group_size if options.q_group_size is not None else (choice.q_group_size or None)
    return replace(options, quantize=choice.quantize, q_group_size=group, q_symmetric=choice.q_symmetric), choice
