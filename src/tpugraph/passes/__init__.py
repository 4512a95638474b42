"""Graph passes: exported segments -> static, simplified, tpu-mlir-ready ONNX.

Names are loaded on first use (PEP 562), so importing ``tpugraph.passes.base`` (the contract) imports no
pass module.
"""

from importlib import import_module

_WHERE = {
    "GraphPass": "base", "PassContext": "base", "PassResult": "base",
    "DEFAULT_CHAIN": "chain", "PASSES": "chain", "default_chain": "chain", "get_pass": "chain",
    "parse_pass_options": "chain", "resolve_chain": "chain", "run_chain": "chain",
    "FileRunReport": "run_file", "run_passes_on_file": "run_file",
}

__all__ = sorted([*_WHERE, "PassFailed"])


def __getattr__(name: str):
    if name == "PassFailed":
        from tpugraph.errors import PassFailed

        return PassFailed
    if name in _WHERE:
        value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
