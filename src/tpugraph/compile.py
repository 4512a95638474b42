"""Compiling OUT with tpu-mlir, the public face: options (compile_options), planning the tool runs
(compile_plan), the bash script (compile_script), running them (compile_runner), their logs (tool_logs) and
the report (compile_report). Import from here; each job lives in its own module."""

from __future__ import annotations

from .compile_options import (CHECK_MODES, CHIPS, DEFAULT_Q_GROUP_SIZE, HEAD_KINDS, IO_ALONE_KINDS, NUM_DEVICES,
                              QUANT_INPUT_KINDS, QUANT_OUTPUT_KINDS, QUANTIZE_MODES, CompileOptions)
from .compile_plan import OUT_VAR, CompilePlan, Step, bmodel_name, deploy_flags, plan_compile, representatives
from .compile_report import CompileReport, SegmentCompileError, SegmentCompileResult, format_table
from .compile_runner import ProgressFn, compile_segments, run_step
from .compile_script import render_script, save_script, write_compile_script
from .tool_logs import failure_reason, log_tail, parse_min_cosine
from .toolchain import TOOLS, check_toolchain, default_tpu_mlir_venv, tool_environment

__all__ = [
    "CHECK_MODES", "CHIPS", "DEFAULT_Q_GROUP_SIZE", "HEAD_KINDS", "IO_ALONE_KINDS", "NUM_DEVICES", "QUANT_INPUT_KINDS",
    "QUANT_OUTPUT_KINDS", "QUANTIZE_MODES", "CompileOptions", "OUT_VAR", "CompilePlan", "Step", "bmodel_name",
    "deploy_flags", "plan_compile", "representatives", "CompileReport", "SegmentCompileError",
    "SegmentCompileResult", "format_table", "ProgressFn", "compile_segments", "run_step", "render_script",
    "save_script", "write_compile_script", "failure_reason", "log_tail", "parse_min_cosine", "TOOLS",
    "check_toolchain", "default_tpu_mlir_venv", "tool_environment",
]
