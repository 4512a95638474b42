"""tpugraph: Hugging Face causal LMs -> the ONNX segments of Sophgo's tpu-mlir / LLM-TPU runtime, and a bmodel proven
to talk like the original.

One way in for library users, the same four jobs as the command line::

    import tpugraph
    manifest = tpugraph.export_and_optimize("path/to/model", "out", tpugraph.ExportOptions(seq_length=256))
    report = tpugraph.verify("out")                      # .passed: tokens and logits as transformers
    report = tpugraph.compile("out", options=tpugraph.CompileOptions(quantize="BF16"))
    result = tpugraph.run("out", prompt_ids=[1, 2, 3], max_new_tokens=8)

The folders follow the pipeline: ``source`` (model input), ``contract`` (segments, manifest), ``export``,
``passes``, ``compiler`` with ``tpu_mlir`` (its bridge; ``tpu_mlir/guest`` runs inside tpu-mlir's venv),
``runtime``, ``proof``, and ``cli``. The names below are loaded when first used, so ``import tpugraph`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_PUBLIC = {
    "export_and_optimize": ("tpugraph.export.pipeline", "export_and_optimize"),
    "ExportOptions": ("tpugraph.export.pipeline", "ExportOptions"),
    "compile": ("tpugraph.compiler.runner", "compile_segments"),
    "CompileOptions": ("tpugraph.compiler.options", "CompileOptions"),
    "verify": ("tpugraph.proof.verify", "verify"),
    "run": ("tpugraph.runtime.text", "run_prompt"),
    "read_manifest": ("tpugraph.contract.manifest", "read_manifest"),
    "TpugraphError": ("tpugraph.errors", "TpugraphError"),
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tpugraph' has no attribute {name!r}")
    module, attr = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
