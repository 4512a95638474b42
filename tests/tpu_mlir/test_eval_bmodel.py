"""tpugraph eval --bmodel on the cmodel: a tiny Llama with tied embeddings (so the vocabulary matrix is shared and
lm_head_all is the bare projection) compiled BF16 with --eval-head, its perplexity beside transformers'; a bmodel
without the evaluation head is one line."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_LLAMA, build_model_dir, save_word_tokenizer
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.compiler.runner import run_tool
from tpugraph.proof.perplexity import evaluate
from tpugraph.tpu_mlir.toolchain import tool_environment

pytestmark = pytest.mark.slow


def test_eval_bmodel_bf16_against_transformers(tmp_path, toolchain):
    model_dir = build_model_dir(tmp_path / "model", "llama", tie_word_embeddings=True, **TINY_LLAMA)
    save_word_tokenizer(model_dir, TINY_LLAMA["vocab_size"], "")
    out = tmp_path / "out"
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize

    export_and_optimize(str(model_dir), out, ExportOptions(seq_length=16))
    text = tmp_path / "text.txt"
    words = np.random.default_rng(0).integers(0, TINY_LLAMA["vocab_size"] - 5, size=40)
    text.write_text(" ".join(f"w{i}" for i in words))

    report = compile_segments(out, toolchain, CompileOptions(quantize="bf16", check="none", eval_head=True), jobs=2)
    assert report.bmodel.name.endswith("_eval.bmodel") and report.plan.vocab_sharing is not None
    scored = evaluate(out, text=text, windows=2, bmodel=report.bmodel, tpu_mlir=toolchain)
    onnx = evaluate(out, text=text, windows=2)
    assert scored.mode == "bmodel-bf16" and scored.backend.startswith("bmodel on the cmodel")
    assert scored.positions == 30 and scored.reference_perplexity == pytest.approx(onnx.reference_perplexity)
    # BF16 activations and weights: near transformers' perplexity, not equal to it; the same top-1 almost everywhere
    assert abs(scored.relative_difference) < 0.02 and scored.relative_difference != onnx.relative_difference
    assert scored.top1_agreement >= 0.9

    # The same nets combined without lm_head_all: eval refuses it in one line.
    work = out / report.plan.work_dir
    plain = tmp_path / "plain.bmodel"
    nets = [s for s in report.plan.segments]
    rc = run_tool(["model_tool", "--combine", *(f"{n}/{n}.bmodel" for n in nets), "-o", str(plain)], work,
                  tmp_path / "combine.log", tool_environment(toolchain))
    assert rc == 0 and plain.is_file()
    r = CliRunner().invoke(app, ["eval", str(out), "--text", str(text), "--bmodel", str(plain), "--tpu-mlir",
                                 str(toolchain)])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --bmodel plain.bmodel has no lm_head_all net"), r.output
