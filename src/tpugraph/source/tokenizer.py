"""The source model's tokenizer and chat template, copied into OUT so that OUT alone can talk (tpugraph run), and
loaded back from OUT."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..contract.manifest_records import TokenizerRecord
from ..errors import ModelError, OutputError, UsageError

if TYPE_CHECKING:
    from ..contract.manifest import Manifest
    from .checkpoint import ModelSource

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
# What transformers' tokenizers read (fast and slow), the chat template in its own files, the generation config
# (its eos_token_id may list more stop tokens than config.json, e.g. a chat model's end-of-turn) and the image
# processor's settings.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json",
                   "preprocessor_config.json")  # a vision-language model's image processor (runtime/images.py)
# Any one of these makes a usable tokenizer.
ESSENTIAL = ("tokenizer.json", "tokenizer.model", "vocab.json")


def copy_tokenizer(model: "ModelSource | Path", out_dir: Path) -> TokenizerRecord:
    """Copy the tokenizer files the source has into OUT/tokenizer/; the manifest record of what was copied.

    ``{"dir": "tokenizer", "files": [...], "chat_template": bool}``, or ``{"files": [], "missing": "..."}`` when
    the source has no tokenizer (the presets): ``run`` then names what is missing and still takes
    ``--prompt-ids``. A .gguf source carries its tokenizer in its metadata: it is built the way transformers
    does it and saved."""
    from .checkpoint import ModelSource

    if isinstance(model, ModelSource) and model.gguf_file:
        return _save_gguf_tokenizer(model, Path(out_dir))
    source = model.path if isinstance(model, ModelSource) else Path(model)
    out_dir = Path(out_dir)
    present = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not any(name in present for name in ESSENTIAL):
        # no path in the record: a manifest must not depend on where its source sat (the manifest names it)
        return TokenizerRecord(files=[], missing=f"the source model has none of {', '.join(ESSENTIAL)}")
    target = out_dir / TOKENIZER_DIR
    try:
        target.mkdir(exist_ok=True)
        for name in present:
            tmp = target / f".{name}.tmp{os.getpid()}"
            shutil.copyfile(source / name, tmp)
            os.replace(tmp, target / name)
    except OSError as exc:
        raise OutputError(f"cannot copy the tokenizer into {target}: {exc.strerror or exc}") from None
    chat = "chat_template.jinja" in present or "chat_template.json" in present or _config_has_template(source)
    log.info("copied %d tokenizer file(s) to %s%s", len(present), target, " (with chat template)" if chat else "")
    return TokenizerRecord(dir=TOKENIZER_DIR, files=present, chat_template=chat)


def _save_gguf_tokenizer(model, out_dir: Path) -> TokenizerRecord:
    from ..errors import ModelError
    from .checkpoint import load_tokenizer

    try:
        tokenizer = load_tokenizer(model)
    except ModelError as err:  # a .gguf without tokenizer metadata still exports; run then names what is missing
        log.info("%s", err)
        return TokenizerRecord(files=[], missing="the .gguf file has no usable tokenizer metadata")
    target = out_dir / TOKENIZER_DIR
    stage = out_dir / f".tpugraph-stage-tokenizer-{os.getpid()}"
    try:
        shutil.rmtree(stage, ignore_errors=True)
        tokenizer.save_pretrained(str(stage))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(stage, target)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise OutputError(f"cannot write the tokenizer into {target}: {exc.strerror or exc}") from None
    present = sorted(p.name for p in target.iterdir() if p.is_file())
    chat = bool(getattr(tokenizer, "chat_template", None))
    log.info("saved the GGUF file's tokenizer to %s%s", target, " (with chat template)" if chat else "")
    return TokenizerRecord(dir=TOKENIZER_DIR, files=present, chat_template=chat, from_="gguf metadata")


def _config_has_template(source: Path) -> bool:
    import json

    try:
        return bool(json.loads((source / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


IDS_INSTEAD = "give token ids instead with --prompt-ids 1,2,3"
REEXPORT = "or export a model folder that has its tokenizer files (tokenizer.json or tokenizer.model)"


def load_output_tokenizer(out_dir: Path, manifest: Manifest, instead: str = IDS_INSTEAD):
    """OUT's copy of the source model's tokenizer, or a UsageError naming what is missing and what the user can
    do ``instead`` (run takes token ids; a chat needs text, so it points elsewhere)."""
    record = manifest.model.tokenizer
    if not record:
        raise UsageError(f"'{out_dir}' has no tokenizer (exported by a tpugraph that did not copy it): "
                         f"re-export it, or {instead}")
    if not record.files:
        raise UsageError(f"'{out_dir}' has no tokenizer: {record.missing or 'the source model had none'}; "
                         f"{instead}, {REEXPORT}")
    folder = out_dir / (record.dir or TOKENIZER_DIR)
    lost = [f for f in record.files if not (folder / f).is_file()]
    if lost:
        raise UsageError(f"tokenizer file(s) {', '.join(lost)} missing from {folder}: re-export, or {instead}")
    from transformers import AutoTokenizer

    from .checkpoint import quiet_transformers

    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers' own message says which file or class it could not use
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"transformers cannot load the tokenizer in {folder}: {first}") from None


def added_token_id(source: Path, text: str) -> int:
    """The id of the added token ``text`` in the source model's tokenizer files (tokenizer.json's added_tokens, or
    tokenizer_config.json's added_tokens_decoder), read as JSON: a vision family's image brackets that its config
    does not name (InternVL's <img>). ModelError when neither file has it."""
    import json

    def read(name: str) -> dict:
        try:
            return json.loads((Path(source) / name).read_text())
        except (OSError, ValueError):
            return {}

    found = [t.get("id") for t in read("tokenizer.json").get("added_tokens") or () if t.get("content") == text]
    found += [i for i, t in (read("tokenizer_config.json").get("added_tokens_decoder") or {}).items()
              if t.get("content") == text]
    if not found:
        raise ModelError(f"the source model's tokenizer has no token {text!r} (tokenizer.json added_tokens or "
                         "tokenizer_config.json added_tokens_decoder): the image's brackets need its id")
    return int(found[0])
