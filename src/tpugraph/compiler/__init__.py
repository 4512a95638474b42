"""Compiling OUT with tpu-mlir, the public face: what may be asked (options), the ordered tool runs (plan), the
bash script (script), running them (runner) and what a compile did (report); the tools' logs and venv live in
tpugraph.tpu_mlir. Import from here; each job lives in its own module."""

from __future__ import annotations

from ..tpu_mlir.logs import failure_reason, log_tail, parse_min_cosine
from ..tpu_mlir.toolchain import TOOLS, check_toolchain, default_tpu_mlir_venv, tool_environment
from .options import (CHECK_MODES, CHIPS, DEFAULT_Q_GROUP_SIZE, HEAD_KINDS, IO_ALONE_KINDS, NUM_DEVICES,
                      QUANT_INPUT_KINDS, QUANT_OUTPUT_KINDS, QUANTIZE_MODES, CompileOptions)
from .plan import OUT_VAR, CompilePlan, Step, bmodel_name, deploy_flags, plan_compile, representatives
from .progress import ProgressFn, StepEvent
from .report import CompileReport, SegmentCompileError, SegmentCompileResult, format_table
from .runner import compile_segments, run_step
from .script import render_script, save_script, write_compile_script

__all__ = [
    "CHECK_MODES", "CHIPS", "DEFAULT_Q_GROUP_SIZE", "HEAD_KINDS", "IO_ALONE_KINDS", "NUM_DEVICES", "QUANT_INPUT_KINDS",
    "QUANT_OUTPUT_KINDS", "QUANTIZE_MODES", "CompileOptions", "OUT_VAR", "CompilePlan", "Step", "bmodel_name",
    "deploy_flags", "plan_compile", "representatives", "CompileReport", "SegmentCompileError",
    "SegmentCompileResult", "format_table", "ProgressFn", "StepEvent", "compile_segments", "run_step", "render_script",
    "save_script", "write_compile_script", "failure_reason", "log_tail", "parse_min_cosine", "TOOLS",
    "check_toolchain", "default_tpu_mlir_venv", "tool_environment",
]
