"""tpugraph eval on a tiny Llama (tied embeddings, a word tokenizer): the perplexity of OUT's segments in onnxruntime
equals transformers' on the same windows, every next-token prediction agrees, and bad input is one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import TINY_LLAMA, build_model_dir, save_word_tokenizer
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.compiler.eval_head import write_eval_head
from tpugraph.contract.manifest import read_manifest
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.perplexity import builtin_text, evaluate

SEQ = 24
runner = CliRunner()


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(model folder, OUT, a text of 100 words of the tokenizer's vocabulary)."""
    root = tmp_path_factory.mktemp("eval")
    model_dir = build_model_dir(root / "model", "llama", tie_word_embeddings=True, **TINY_LLAMA)
    save_word_tokenizer(model_dir, TINY_LLAMA["vocab_size"], "")
    out = root / "out"
    export_and_optimize(str(model_dir), out, ExportOptions(seq_length=SEQ, max_input_length=16))
    words = np.random.default_rng(0).integers(0, TINY_LLAMA["vocab_size"] - 5, size=100)
    text = root / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in words))
    return model_dir, out, text


def transformers_perplexity(model_dir, windows: list[list[int]]) -> float:
    """exp of transformers' own mean causal-LM loss over the windows (each of equal length)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def test_onnx_perplexity_equals_transformers(scored):
    model_dir, out, text = scored
    report = evaluate(out, text=text, windows=3)
    # the windows are the prefill's L = 16 tokens (--max-input-length), not SEQ
    assert report.window_length == 16 and len(report.windows) == 3 and report.positions == 3 * 15
    assert report.backend == "onnxruntime" and report.mode == "float32"
    assert abs(report.relative_difference) < 1e-3
    assert report.top1_agreement == 1.0
    ids = [int(w[1:]) + 5 for w in text.read_text().split()]  # the word tokenizer: w<i> is id i + 5
    expected = transformers_perplexity(model_dir, [ids[i * 16:(i + 1) * 16] for i in range(3)])
    assert report.reference_perplexity == pytest.approx(expected, rel=1e-5)
    # a shorter window and a text with fewer windows than asked for
    short = evaluate(out, text=text, windows=50, window_length=7)
    assert short.window_length == 7 and len(short.windows) == 100 // 7 and short.positions == (100 // 7) * 6
    assert abs(short.relative_difference) < 1e-3 and short.top1_agreement == 1.0


def test_cli_eval_prints_both_side_by_side_and_json(scored):
    _, out, text = scored
    r = runner.invoke(app, ["eval", str(out), "--text", str(text), "--windows", "2"])
    assert r.exit_code == 0, r.output
    assert "transformers (float32)" in r.output and "float32 on onnxruntime" in r.output
    assert "top-1 agreement 100.00% (30 of 30 positions)" in r.output
    r = runner.invoke(app, ["eval", str(out), "--text", str(text), "--windows", "2", "--json"])
    data = json.loads(r.output)
    assert data["windows"] == 2 and data["positions"] == 30 and abs(data["relative_difference"]) < 1e-3


def test_the_eval_head_scores_every_row_as_lm_head_does(scored, tmp_path):
    import onnxruntime as ort

    _, out, _ = scored
    manifest = read_manifest(out)
    spec = write_eval_head(out, manifest, tmp_path / "lm_head_all.onnx")
    assert spec.inputs[0].shape == (16, 48) and spec.outputs[0].shape == (16, TINY_LLAMA["vocab_size"])
    states = np.random.default_rng(1).standard_normal((16, 48)).astype(np.float32)
    (rows,) = ort.InferenceSession(str(tmp_path / "lm_head_all.onnx")).run(None, {"hidden_states": states})
    head = ort.InferenceSession(str(out / "lm_head.onnx"))
    one_by_one = np.concatenate([head.run(None, {"hidden_states": states[i:i + 1]})[0] for i in range(16)])
    np.testing.assert_allclose(rows, one_by_one, rtol=1e-5, atol=1e-5)
    assert not list(out.glob(".tpugraph-eval-*"))  # eval's own copy went with it


def test_builtin_text_ships_with_the_package():
    text = builtin_text()
    assert text.startswith("Pride and Prejudice") and len(text.split()) > 2500


def one_line(result, code: int, needle: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


def test_bad_eval_input_is_one_line(scored, tmp_path):
    _, out, text = scored
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    for args, needle in (
            (["--text", str(tmp_path / "missing.txt")], "--text '"),
            (["--text", str(empty)], "is empty"),
            (["--text", str(short)], "the text is 3 tokens, shorter than one window of 16"),
            ([], "give exactly one of --text FILE or --builtin"),
            (["--text", str(text), "--builtin"], "give exactly one of --text FILE or --builtin"),
            (["--text", str(text), "--window-length", "17"], "--window-length must be within 2..16"),
            (["--text", str(text), "--windows", "0"], "--windows must be >= 1")):
        one_line(runner.invoke(app, ["eval", str(out), *args]), 2, needle)


def test_an_output_without_logits_or_tokenizer_is_one_line(scored, tmp_path):
    model_dir, _, text = scored
    topk = tmp_path / "topk"
    export_and_optimize(str(model_dir), topk, ExportOptions(seq_length=8, lm_head_topk=True))
    one_line(runner.invoke(app, ["eval", str(topk), "--text", str(text)]), 2, "returns the greedy token only")
    bare = tmp_path / "bare"
    export_and_optimize("tiny-llama", bare, ExportOptions(seq_length=8))
    one_line(runner.invoke(app, ["eval", str(bare), "--builtin"]), 2, "has no tokenizer")


def test_compile_plan_adds_the_eval_head_only_when_asked(scored):
    from tpugraph.compiler import CompileOptions
    from tpugraph.compiler.plan import plan_compile
    from tpugraph.compiler.script import write_compile_script

    _, out, _ = scored
    plain = plan_compile(out, CompileOptions(quantize="w4bf16"))
    assert "lm_head_all" not in plain.segments and not any("lm_head_all" in " ".join(s.argv) for s in plain.steps)
    script = write_compile_script(out, CompileOptions(quantize="w4bf16", eval_head=True))
    plan = plan_compile(out, CompileOptions(quantize="w4bf16", eval_head=True))
    assert plan.bmodel.endswith("_w4bf16_seq24_bm1684x_1dev_eval.bmodel") and "--eval-head" in plan.command
    head = [s for s in plan.steps if s.segment == "lm_head_all"]
    assert [s.action.value for s in head] == ["transform", "deploy"]
    # tied embeddings: the matrix is shared, so the head keeps the float type as lm_head does
    assert plan.vocab_sharing is not None and "BF16" in head[1].argv and "W4BF16" not in head[1].argv
    assert "lm_head_all/lm_head_all.bmodel" in plan.steps[-1].argv
    written = out / plan.work_dir / "lm_head_all" / "lm_head_all.onnx"
    assert written.is_file() and "lm_head_all" in script.read_text()
    import onnx

    graph = onnx.load(str(written), load_external_data=False).graph
    assert [n.op_type for n in graph.node] == ["Transpose", "MatMul", "Transpose"]  # the bare projection
