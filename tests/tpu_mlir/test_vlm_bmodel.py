"""A vision-language output compiled by the real compiler, its vit net beside the others in one bmodel, proven on
the cmodel with an image token for token against transformers (verify --bmodel --image) and driven by run --backend
bmodel --image. The tiny Qwen2.5-VL of tests/vlm_models.py, 64 patches (16 image tokens), SEQ 32: a compile is
about 100 s here with the tools' compares, each cmodel token a few seconds."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner
from vlm_models import MAX_PIXELS, VISION, build_qwen2_5_vl

from tpugraph.cli import app
from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.runtime.text import run_prompt
from tpugraph.tpu_mlir.toolchain import tool_environment

pytestmark = pytest.mark.slow

SEQ = 32
runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = build_qwen2_5_vl(tmp_path_factory.mktemp("vlm-model"))
    out = tmp_path_factory.mktemp("vlm-bmodel") / "out"
    export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ, max_pixels=MAX_PIXELS, with_test_data=True))
    return out


@pytest.fixture(scope="module", params=["f16", "bf16"])
def compiled(request, exported, toolchain):
    """F16 with compile's default check (the tools' compares on the vit and one net per structure, then the
    end-to-end verify --bmodel with the synthetic picture); BF16 unchecked and verified by the test with a file."""
    check = "representative" if request.param == "f16" else "none"
    report = compile_segments(exported, toolchain, CompileOptions(quantize=request.param, check=check), jobs=2)
    return request.param, report


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("picture") / "cat.png"
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8), "RGB").save(path)
    return path


def test_verify_bmodel_with_an_image_passes_token_for_token(compiled, exported, toolchain, picture):
    mode, report = compiled
    assert report.passed and "vit" in {r.segment for r in report.results}
    if mode == "f16":  # compile's default check: the tools compared the vit, then verify --bmodel ran end to end
        vit = next(r for r in report.results if r.segment == "vit")
        assert vit.checked and vit.min_similarity >= 0.99
        proof = report.end_to_end
        assert proof is not None and proof.vision["image"] == "synthetic"
        assert proof.dtype == "bmodel-f16" and not proof.teacher_forced and proof.tokens_equal and proof.passed
        return
    assert report.end_to_end is None
    r = runner.invoke(app, ["verify", str(exported), "--bmodel", str(report.bmodel), "--tpu-mlir", str(toolchain),
                            "--image", str(picture), "--prompt-length", "3", "--new-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    proof = json.loads(r.output[r.output.index("{"):])
    assert proof["dtype"] == "bmodel-bf16" and proof["backend"].startswith("bmodel on the cmodel")
    assert proof["hf_tokens"] == proof["onnx_tokens"] and len(proof["hf_tokens"]) == 3 and not proof["teacher_forced"]
    assert proof["vision"]["image"] == str(picture) and proof["vision"]["image_tokens"] > 0
    assert proof["vision"]["vit_cosine"] >= proof["vision"]["min_vit_cosine"]


def test_every_vit_block_attention_is_one_flash_attention_op(compiled, exported):
    """The vit's attention is exported in the layout tpu-mlir fuses (scripts/vit_estimate.py: the Qwen2.5-VL-3B vit
    at llm_convert's estimate): one FAttention per vision block, and none of the Permutes it keeps otherwise."""
    mode, report = compiled
    if mode != "f16":
        pytest.skip("the fusion does not depend on the precision: the F16 compile shows it")
    depth = VISION["depth"]  # build_qwen2_5_vl's vision tower
    (tpu_mlir,) = exported.glob(f"compile/{mode}_*/vit/vit_*_tpu.mlir")
    text = tpu_mlir.read_text()
    assert text.count('"tpu.FAttention"') == depth and '"tpu.Permute"' not in text


def test_run_backend_bmodel_with_an_image_gives_the_onnx_tokens(compiled, exported, toolchain, picture):
    mode, report = compiled
    if mode != "f16":
        pytest.skip("one precision is enough for run: verify proves both")
    onnx = run_prompt(exported, prompt="w3 w4 w5", chat=True, image=picture, max_new_tokens=3)
    r = runner.invoke(app, ["run", str(exported), "--prompt", "w3 w4 w5", "--chat", "--image", str(picture),
                            "--max-new-tokens", "3", "--backend", "bmodel", "--bmodel", str(report.bmodel),
                            "--tpu-mlir", str(toolchain), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])
    assert result["tokens"] == onnx.tokens and result["backend"].startswith("bmodel on the cmodel")


def test_a_bmodel_without_the_vit_net_is_one_line(compiled, exported, toolchain, picture, tmp_path):
    mode, report = compiled
    if mode != "f16":
        pytest.skip("the refusal does not depend on the precision")
    work = exported / report.plan.work_dir
    parts = [f"{name}/{name}.bmodel" for name in report.plan.segments if name != "vit"]
    text_only = tmp_path / "text_only.bmodel"
    subprocess.run([str(toolchain / "bin" / "model_tool"), "--combine", *parts, "-o", str(text_only)], cwd=work,
                   check=True, capture_output=True, env=tool_environment(toolchain))
    r = runner.invoke(app, ["verify", str(exported), "--bmodel", str(text_only), "--tpu-mlir", str(toolchain),
                            "--image", str(picture)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "text_only.bmodel has no vit net" in lines[0], r.output
