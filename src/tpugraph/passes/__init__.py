"""Graph passes: exported segments -> static, simplified, tpu-mlir-ready ONNX."""

from .base import GraphPass, PassContext, PassFailed, PassResult
from .chain import DEFAULT_CHAIN, PASSES, default_chain, get_pass, parse_pass_options, resolve_chain, run_chain
from .run_file import FileRunReport, run_passes_on_file

__all__ = [
    "DEFAULT_CHAIN",
    "PASSES",
    "FileRunReport",
    "GraphPass",
    "PassContext",
    "PassFailed",
    "PassResult",
    "default_chain",
    "get_pass",
    "parse_pass_options",
    "resolve_chain",
    "run_chain",
    "run_passes_on_file",
]
