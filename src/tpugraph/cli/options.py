"""Options and arguments several commands take, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

OutFolder = Annotated[Path, typer.Argument(help="An output folder written by export-and-optimize.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
TpuMlirVenv = Annotated[Optional[Path], typer.Option(
    "--tpu-mlir", help="The tpu-mlir venv made by scripts/setup_tpu_mlir.sh (default: $TPUGRAPH_TPU_MLIR_VENV, "
                       "else the script's default location).")]
Backend = Annotated[str, typer.Option(
    "--backend", help="onnx: OUT's segments in onnxruntime; bmodel: a compiled bmodel on tpu-mlir's cmodel chip "
                      "simulator.")]
BmodelFile = Annotated[Optional[Path], typer.Option(
    "--bmodel", help="The combined bmodel for --backend bmodel (default: the one .bmodel in OUT).")]
PassOptions = Annotated[Optional[list[str]], typer.Option(
    "--option", help="A pass option PASS.KEY=VALUE (repeatable), e.g. rename_kv_io.convention=optimum.")]
_QUANTIZE_HELP = ("Quantization: auto, f16, bf16, w8bf16, w4bf16, w8f16 or w4f16 (blocks and lm_head; the embedding keeps "
                  "the float type, the greedy/sample heads stay F32). auto (default): for a quantized source (GPTQ, AWQ, "
                  "GGUF...) the weight-only mode, group size and symmetry that keep its integers best; f16 otherwise.")
Chip = Annotated[str, typer.Option("--chip", help="Target chip: bm1684x, bm1688, cv186x or bm1690 (compiler/chips.py).")]
Quantize = Annotated[str, typer.Option("--quantize", help=_QUANTIZE_HELP)]
QGroupSize = Annotated[Optional[int], typer.Option(
    "--q-group-size", help="Group size of the weight-only modes (default 64, model_deploy's, for w4* and w8* alike).")]
NumDevice = Annotated[int, typer.Option("--num-device", help="Number of TPUs to split the model over (1, 2, 4, 8; bm1684x).")]
NumCore = Annotated[int, typer.Option("--num-core", help="TPU cores of the chip each net is compiled for (model_deploy --num_core): 1 up to the chip's (bm1688: 2, bm1690: 8). A bmodel for more cores than the board's chip has computes garbage.")]
CompileCheck = Annotated[str, typer.Option(
    "--check", help="representative: tpu-mlir's numerical compares on one segment of each distinct structure "
    "(those with test data: export-and-optimize --with-test-data), then an end-to-end greedy check of the bmodel on "
    "the cmodel (verify --bmodel, a few tokens); all: the compares on every segment.")]
NoCheck = Annotated[bool, typer.Option("--no-check", help="No numerical check at all.")]
NoFuse = Annotated[bool, typer.Option(
    "--no-fuse", help="Hand tpu-mlir the graphs as its ONNX front end converts them: rotary embedding and attention "
    "not rewritten into top.Rope / top.FAttention (slower nets; for comparison and as a way around a fusion problem).")]
NoShareVocab = Annotated[bool, typer.Option(
    "--no-share-vocab", help="Keep the contract's cut in the bmodel: lm_head applies the final norm, so a tied "
    "vocabulary matrix is stored twice (by default the final norm moves into the last layer's nets for tpu-mlir and "
    "lm_head shares the embedding's coefficients).")]
Dynamic = Annotated[bool, typer.Option(
    "--dynamic", help="Compile the prefill nets (block_i, block_kv_i) with tpu-mlir's --dynamic: the runtime runs them "
    "at the prompt's real length instead of always L tokens (run/verify --bmodel then do). Writes "
    "..._dynamic.bmodel.")]

EvalHead = Annotated[bool, typer.Option(
    "--eval-head", help="Also compile lm_head_all, lm_head over every position of a prefill, for tpugraph eval --bmodel "
    "(perplexity on the cmodel); no runtime uses it, so only when asked. Writes ..._eval.bmodel.")]


def _choices(values) -> str:
    return ", ".join(values)
DeviceMemory = Annotated[Optional[float], typer.Option(
    "--device-memory", help="GiB of memory the model may take on each device (default: the chip's, see "
    "docs/guides/chips-and-memory.md). The compile refuses a model its memory plan puts above it.")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", help="Print the memory plan (weights per net group, KV cache, activations per device, whether it "
    "fits) and the tool runs, and stop: no tool runs, no tpu-mlir needed.")]
