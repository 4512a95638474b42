"""Shared fixtures (tiny random-weight Hugging Face models written with save_pretrained into temp folders, the tpu-mlir
toolchain) and the test tiers.

The tiers are folders, and each folder gives its tests their marker: ``unit`` (no model export: fast, for
development), ``integration`` (tiny models exported and verified in onnxruntime), ``tpu_mlir`` (the real compiler
and its cmodel; skipped with the reason without the toolchain of scripts/setup_tpu_mlir.sh) and ``real_model`` (the
real SmolLM2 of scripts/make_smollm2.py). A test that needs the toolchain outside tests/tpu_mlir or tests/real_model
is refused at collection, so the folders stay true."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tpugraph.compiler import default_tpu_mlir_venv

TIERS = ("unit", "integration", "tpu_mlir", "real_model")
NEEDS_THE_TOOLCHAIN = ("tpu_mlir", "real_model")
SETUP_STAMP = ".tpugraph-tpu-mlir-setup"  # written by scripts/setup_tpu_mlir.sh when it is done


def tier_of(path: Path) -> str | None:
    parts = Path(path).parts
    return next((p for p in parts[parts.index("tests") + 1:][:1] if p in TIERS), None) if "tests" in parts else None


def pytest_collection_modifyitems(config, items):
    misplaced = []
    for item in items:
        tier = tier_of(item.path)
        if tier is None:
            misplaced.append(f"{item.nodeid}: not in a tier folder ({', '.join('tests/' + t for t in TIERS)})")
            continue
        # A real-model test may also need the compiler (it says so with the tpu_mlir marker); nothing else may
        # carry another tier's marker.
        allowed = {tier, "tpu_mlir"} if tier == "real_model" else {tier}
        if other := {m.name for m in item.iter_markers() if m.name in TIERS} - allowed:
            misplaced.append(f"{item.nodeid}: marked {', '.join(sorted(other))} but in tests/{tier}")
        if tier not in NEEDS_THE_TOOLCHAIN and "toolchain" in getattr(item, "fixturenames", ()):
            misplaced.append(f"{item.nodeid}: needs the tpu-mlir toolchain: move it to tests/tpu_mlir")
        item.add_marker(getattr(pytest.mark, tier))
    if misplaced:
        raise pytest.UsageError("tests outside their tier:\n  " + "\n  ".join(misplaced))


def find_toolchain() -> tuple[Path | None, str]:
    """The venv of $TPUGRAPH_TPU_MLIR_VENV, else the setup script's default one if its setup finished."""
    venv = default_tpu_mlir_venv()
    configured = bool(os.environ.get("TPUGRAPH_TPU_MLIR_VENV"))
    where = f"{venv} ({'$TPUGRAPH_TPU_MLIR_VENV' if configured else 'the default location'})"
    if not (venv / "bin" / "model_transform.py").exists():
        return None, (f"tpu-mlir toolchain not found at {where}: run scripts/setup_tpu_mlir.sh "
                      "or set TPUGRAPH_TPU_MLIR_VENV to its venv")
    if not configured and not (venv / SETUP_STAMP).is_file():
        return None, f"tpu-mlir setup at {where} did not finish: rerun scripts/setup_tpu_mlir.sh"
    return venv, ""


def pytest_configure(config):
    # Presets materialise into a per-run cache, never into the user's home; one per pytest-xdist worker, so two
    # workers never build the same preset into one folder at once.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    os.environ.setdefault("TPUGRAPH_CACHE", str(Path(config.rootpath) / ".pytest_cache" / "-".join(
        filter(None, ("tpugraph-cache", worker)))))


def build_model_dir(folder: Path, model_type: str, seed: int = 0, **config_kwargs) -> Path:
    """A random-weight causal LM of ``model_type`` saved with save_pretrained (safetensors) into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_kwargs.setdefault("initializer_range", 0.2)  # well-separated logits: no greedy near-ties
    config = AutoConfig.for_model(model_type, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                # Trained norms are not all ones; equal ones would hide a swapped or dropped norm weight.
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    return folder


def save_word_tokenizer(folder: Path, vocab_size: int, chat_template: str) -> None:
    """A word-level tokenizer over ``vocab_size`` made-up words (``<unk> <s> </s> <|user|> <|assistant|> w0 w1
    ...``) with ``chat_template``, saved the HF way beside a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = chat_template
    fast.save_pretrained(folder)


TINY_LLAMA = dict(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2)


@pytest.fixture
def make_model(tmp_path_factory):
    """make_model(model_type, **config) -> folder of a tiny saved model."""

    def make(model_type: str = "llama", seed: int = 0, **config_kwargs) -> Path:
        folder = tmp_path_factory.mktemp(f"{model_type}-model")
        return build_model_dir(folder, model_type, seed=seed, **config_kwargs)

    return make


@pytest.fixture(scope="session")
def toolchain() -> Path:
    """The tpu-mlir venv of the tests in tests/tpu_mlir and tests/real_model; skipped with its reason."""
    venv, reason = find_toolchain()
    if venv is None:
        pytest.skip(reason)
    return venv
