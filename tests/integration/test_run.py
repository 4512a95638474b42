"""tpugraph run: OUT's own tokenizer and chat template around the runtime's greedy loop, streamed; the backend
interface and its bmodel driver's wire format; bad input (no tokenizer, prompt too long, no bmodel, no venv)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import TINY_LLAMA, build_model_dir, save_word_tokenizer
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.contract.manifest import read_manifest
from tpugraph.errors import VerificationError
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.runtime.backends.bmodel_backend import NetInfo, check_against_manifest
from tpugraph.runtime.text import run_prompt
from tpugraph.tpu_mlir.guest import wire

SEQ = 32
CHAT_TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
runner = CliRunner()


def save_tokenizer(folder, vocab_size: int) -> None:
    save_word_tokenizer(folder, vocab_size, CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def talking(tmp_path_factory):
    """A tiny Llama with a tokenizer, exported: (model folder, OUT)."""
    model_dir = build_model_dir(tmp_path_factory.mktemp("talking-model"), "llama", **TINY_LLAMA)
    save_tokenizer(model_dir, TINY_LLAMA["vocab_size"])
    out = tmp_path_factory.mktemp("talking") / "out"
    export_and_optimize(str(model_dir), out, ExportOptions(seq_length=SEQ))
    return model_dir, out


def hf_greedy(model_dir, ids, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, eos_token_id=TINY_LLAMA["eos_token_id"],
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_export_copies_the_tokenizer_and_records_it(talking):
    _, out = talking
    record = read_manifest(out).model.tokenizer
    assert record.dir == "tokenizer" and record.chat_template is True
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(record.files)
    for name in record.files:
        assert (out / "tokenizer" / name).is_file()


def test_run_streams_the_greedy_text_of_transformers(talking):
    from transformers import AutoTokenizer

    model_dir, out = talking
    tok = AutoTokenizer.from_pretrained(model_dir)
    pieces: list[str] = []
    result = run_prompt(out, prompt="w10 w20 w30", max_new_tokens=6, on_text=pieces.append)
    assert result.prompt_ids == tok("w10 w20 w30")["input_ids"]
    assert result.tokens == hf_greedy(model_dir, result.prompt_ids, 6)[:len(result.tokens)]
    assert result.text == tok.decode(result.tokens, skip_special_tokens=True)
    assert "".join(pieces) == result.text and len(pieces) > 1  # streamed, not printed at the end
    assert result.backend == "onnxruntime" and result.stop in ("eos", "max-new-tokens")


def test_chat_uses_the_template(talking):
    _, out = talking
    result = run_prompt(out, prompt="w10 w20", chat=True, max_new_tokens=2)
    assert result.prompt_ids == [3, 15, 25, 4]  # <|user|> w10 w20 <|assistant|>


def test_cli_run_prints_text_and_tokens_per_second(talking):
    _, out = talking
    r = runner.invoke(app, ["run", str(out), "--prompt", "w10 w20 w30", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "tokens/s" in r.output and "onnxruntime" in r.output
    r = runner.invoke(app, ["run", str(out), "--prompt-ids", "1,15,25", "--max-new-tokens", "3", "--json"])
    data = json.loads(r.output)
    assert data["prompt_ids"] == [1, 15, 25] and 1 <= len(data["tokens"]) <= 3


def one_line(result, code, *needles):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], (needle, result.output)


@pytest.fixture(scope="module")
def preset_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("preset") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=16))
    return out


def test_a_model_without_tokenizer_names_what_is_missing_and_ids_still_work(preset_out):
    assert read_manifest(preset_out).model.tokenizer.files == []
    one_line(runner.invoke(app, ["run", str(preset_out), "--prompt", "hello"]), 2,
             "no tokenizer", "tokenizer.json", "--prompt-ids")
    r = runner.invoke(app, ["run", str(preset_out), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert len(r.output.split("\n")[0].split()) == 3  # three token ids streamed


@pytest.mark.parametrize("args, code, needle", [
    (["--prompt-ids", ",".join(["5"] * 17)], 2, "longer than this output's SEQ=16"),
    (["--prompt-ids", "1,x"], 2, "comma-separated integers"),
    (["--prompt-ids", "1,99999"], 2, "outside the vocabulary"),
    (["--prompt-ids", "1", "--backend", "gpu"], 2, "--backend must be one of"),
    (["--prompt-ids", "1", "--backend", "bmodel"], 2, "no .bmodel in"),
    (["--prompt-ids", "1", "--backend", "bmodel", "--bmodel", "/nonexistent.bmodel"], 2, "does not exist"),
    (["--prompt-ids", "1", "--bmodel", "x.bmodel"], 2, "--bmodel needs --backend bmodel"),
])
def test_bad_run_input(preset_out, args, code, needle):
    one_line(runner.invoke(app, ["run", str(preset_out), *args]), code, needle)


def test_no_tpu_mlir_venv_is_one_line(preset_out, tmp_path):
    fake = tmp_path / "x.bmodel"
    fake.write_bytes(b"not a bmodel")
    one_line(runner.invoke(app, ["run", str(preset_out), "--prompt-ids", "1", "--backend", "bmodel", "--bmodel",
                                 str(fake), "--tpu-mlir", str(tmp_path)]), 2, "is not a tpu-mlir venv")
    one_line(runner.invoke(app, ["verify", str(preset_out), "--bmodel", str(fake), "--tpu-mlir", str(tmp_path)]),
             2, "is not a tpu-mlir venv")


def nets_of(manifest) -> dict[str, NetInfo]:
    return {s.name: NetInfo([{"name": t.name, "dtype": "f16", "shape": list(t.shape)} for t in s.inputs],
                            [{"name": t.name, "dtype": "f16", "shape": list(t.shape)} for t in s.outputs])
            for s in manifest.segments}


def test_bmodel_nets_are_checked_against_the_manifest(preset_out, tmp_path):
    from pathlib import Path

    manifest = read_manifest(preset_out)
    nets = nets_of(manifest)
    check_against_manifest(nets, manifest, Path("m.bmodel"))  # its own nets: fine
    other = dict(nets)
    del other["block_cache_1"]
    with pytest.raises(VerificationError, match="lacks the net.*block_cache_1"):
        check_against_manifest(other, manifest, Path("m.bmodel"))
    other = dict(nets, lm_head=NetInfo(nets["lm_head"].inputs, [{"name": "x", "dtype": "f32", "shape": [1, 7]}]))
    with pytest.raises(VerificationError, match="net lm_head has output shapes"):
        check_against_manifest(other, manifest, Path("m.bmodel"))


def test_wire_round_trip():
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array([[7]], dtype=np.int32),
              np.zeros((1, 0, 2), np.float16)]
    buf = io.BytesIO()
    wire.write_message(buf, {"op": "run", "net": "block_0"}, arrays)
    wire.write_message(buf, {"op": "quit"})
    buf.seek(0)
    header, got = wire.read_message(buf)
    assert header == {"op": "run", "net": "block_0"}
    for a, b in zip(arrays, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert wire.read_message(buf) == ({"op": "quit"}, [])
    with pytest.raises(EOFError):
        wire.read_message(io.BytesIO(buf.getvalue()[:5]))
