"""Shared fixtures: tiny random-weight Hugging Face models written with save_pretrained into temp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    # Presets materialise into a per-run cache, never into the user's home.
    os.environ.setdefault("TPUGRAPH_CACHE", str(Path(config.rootpath) / ".pytest_cache" / "tpugraph-cache"))


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
    """The tpu-mlir venv of the tests marked tpu_mlir (test_tpu_mlir.find_toolchain); skipped with its reason."""
    from test_tpu_mlir import find_toolchain

    venv, reason = find_toolchain()
    if venv is None:
        pytest.skip(reason)
    return venv
