"""The current LLM-TPU runtime's variants of the nets (issue #12): --lm-head-topk (lm_head returns the greedy
token [1,1] and nothing else) and --embedding-disk (no embedding nets; the host gathers rows of a table),
driven by run and verify in onnxruntime, and on the cmodel for a compiled BF16 bmodel."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.contract.embedding_table import COMPILED_NAME, TABLE_NAME, EmbeddingTable, write_compiled
from tpugraph.contract.manifest import read_manifest, validate
from tpugraph.errors import VerificationError
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify
from tpugraph.runtime.text import run_prompt

SEQ = 16
PROMPT = [1, 45, 97, 200]
runner = CliRunner()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ))
    return out


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    out = tmp_path_factory.mktemp("variant") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ, lm_head_topk=True, embedding_disk=True))
    return out


def test_the_variant_has_its_nets_and_records_its_options(variant):
    manifest = read_manifest(variant)
    names = [s.name for s in manifest.segments]
    assert "embedding" not in names and "embedding_cache" not in names and "greedy_head" not in names
    lm = manifest.segment("lm_head")
    assert [(t.name, t.shape, t.dtype) for t in lm.outputs] == [("token", (1, 1), "int32")]
    assert manifest.options.lm_head_topk and manifest.options.embedding_disk
    vocab, hidden = manifest.model.vocab_size, manifest.model.hidden_size
    table = manifest.conventions.embedding_disk
    assert table.file == TABLE_NAME and table.shape == [vocab, hidden]
    assert (variant / TABLE_NAME).stat().st_size == vocab * hidden * 4
    assert validate(variant) == []


def test_the_table_holds_what_the_embedding_net_outputs(plain, variant):
    session = ort.InferenceSession(str(plain / "embedding.onnx"), providers=["CPUExecutionProvider"])
    ids = np.arange(SEQ, dtype=np.int32)[None] * 7
    want = session.run(None, {"input_ids": ids})[0]
    got = EmbeddingTable.of_output(variant).gather(ids)
    np.testing.assert_array_equal(got, want)


def test_run_and_verify_drive_the_variant_like_the_default_nets(plain, variant):
    want = run_prompt(plain, prompt_ids=PROMPT, max_new_tokens=5).tokens
    assert run_prompt(variant, prompt_ids=PROMPT, max_new_tokens=5).tokens == want
    report = verify(variant, prompt=PROMPT, new_tokens=5)
    assert report.passed and report.onnx_tokens == want and not report.logits_compared
    r = runner.invoke(app, ["verify", str(variant), "--prompt-length", "4", "--new-tokens", "3"])
    assert r.exit_code == 0 and "tokens only: the top-k lm_head returns no logits" in r.output and "PASS" in r.output


def test_a_changed_table_is_caught(variant, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(variant, copy)
    with open(copy / TABLE_NAME, "r+b") as f:
        f.seek(100)
        f.write(b"\x7f\x7f\x7f\x7f")
    assert validate(copy) == [f"embedding table {TABLE_NAME}: size or sha256 does not match the manifest"]
    (copy / TABLE_NAME).unlink()
    with pytest.raises(VerificationError, match="is missing"):
        verify(copy, prompt=PROMPT, new_tokens=2)


def test_gemma_scale_is_in_the_table(tmp_path):
    """Gemma scales its embedding by sqrt(H): the rows hold the scaled values, and greedy decoding still equals
    transformers'."""
    out = tmp_path / "gemma"
    export_and_optimize("tiny-gemma2", out, ExportOptions(seq_length=SEQ, embedding_disk=True, lm_head_topk=True))
    report = verify(out, prompt=PROMPT, new_tokens=3)
    assert report.passed, report.to_json()


@pytest.mark.parametrize("float_type,torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_compiled_table_is_the_rows_in_the_compile_float_type(variant, tmp_path, float_type, torch_dtype):
    dest = write_compiled(variant, float_type, tmp_path / COMPILED_NAME)
    reference = EmbeddingTable.of_output(variant)
    assert dest.stat().st_size == reference.vocab * reference.hidden * 2
    table = EmbeddingTable(dest, reference.vocab, reference.hidden, float_type)
    table.check_matches(reference)
    ids = np.array([[0, 5, reference.vocab - 1]])
    want = torch.from_numpy(reference.gather(ids)).to(torch_dtype).to(torch.float32).numpy()
    np.testing.assert_array_equal(table.gather(ids), want)
    other = EmbeddingTable(dest, reference.vocab, reference.hidden, "bf16" if float_type == "f16" else "f16")
    with pytest.raises(VerificationError, match="written by another compile"):
        other.check_matches(reference)


def test_compile_script_writes_the_same_table(variant, tmp_path):
    """The script's own conversion (run here with this Python's numpy) gives compile's embedding.bin bytes."""
    import re
    import subprocess
    import sys

    from tpugraph.compiler import CompileOptions, write_compile_script

    script = write_compile_script(variant, CompileOptions(quantize="bf16", check="none"), tmp_path / "c.sh").read_text()
    body = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S).group(1)
    assert f'"$OUT/{TABLE_NAME}" "$OUT/{COMPILED_NAME}" bf16' in script
    (tmp_path / "t.py").write_text(body)
    subprocess.run([sys.executable, str(tmp_path / "t.py"), str(variant / TABLE_NAME), str(tmp_path / "a.bin"), "bf16"],
                   check=True)
    write_compiled(variant, "bf16", tmp_path / "b.bin")
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
