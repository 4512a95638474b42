"""The vision-language families beyond Qwen2.5-VL (whose bmodel tests/tpu_mlir/test_vlm_bmodel.py proves on every
run) compiled F16 and BF16 by the real compiler, vit included, and proven with an image on the cmodel token for
token against transformers (verify --bmodel --image). Opt-in (TPUGRAPH_ALL_FAMILY_COMPILES=1): CI's budget."""

from __future__ import annotations

import os
from functools import partial

import pytest
from vlm_models import QWEN3_VL_MAX_PIXELS, build_gemma3, build_internvl, build_qwen3_vl

from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("TPUGRAPH_ALL_FAMILY_COMPILES") != "1",
    reason="the Qwen3-VL, Gemma 3 and InternVL compiles (about a minute per family and precision) run with "
           "TPUGRAPH_ALL_FAMILY_COMPILES=1; test_vlm_bmodel.py compiles Qwen2.5-VL's on every run")]

SEQ = 32
# InternVL: the synthetic picture is 5 tiles (2x2 + thumbnail), each through the vit net on the cmodel. Weights of
# seed 29: transformers' greedy top-1 leads by at least 8% of the logit span at each of the 3 steps (seed 0's second
# step is a near-tie at 1%, which BF16, free running, may take either way).
BUILDERS = {"qwen3_vl": (build_qwen3_vl, QWEN3_VL_MAX_PIXELS), "gemma3_vl": (build_gemma3, None),
            "internvl": (partial(build_internvl, seed=29), None)}


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("mode", ["f16", "bf16"])
def test_vit_compiles_and_verify_bmodel_with_an_image_passes(family, mode, toolchain, tmp_path):
    build, max_pixels = BUILDERS[family]
    out = tmp_path / "out"
    export_and_optimize(str(build(tmp_path / "model")), out,
                        ExportOptions(seq_length=SEQ, max_pixels=max_pixels, with_test_data=True))
    report = compile_segments(out, toolchain, CompileOptions(quantize=mode, check="none"), jobs=2)
    assert report.passed and "vit" in {r.segment for r in report.results}
    proof = verify(out, bmodel=report.bmodel, tpu_mlir=toolchain, prompt_length=3, new_tokens=3)
    assert proof.passed, proof.to_json()
    assert proof.dtype == f"bmodel-{mode}" and proof.hf_tokens == proof.onnx_tokens and not proof.teacher_forced
    assert proof.vision["image"] == "synthetic" and proof.vision["vit_cosine"] >= proof.vision["min_vit_cosine"]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_two_images_on_the_cmodel(family, toolchain, tmp_path):
    """Two images in one prompt (the synthetic picture and a file of another size), each through the bmodel's vit
    net in turn on the cmodel, against transformers' generate with both (F16, token for token)."""
    import numpy as np
    from PIL import Image

    build, max_pixels = BUILDERS[family]
    out = tmp_path / "out"
    export_and_optimize(str(build(tmp_path / "model")), out, ExportOptions(seq_length=48, max_pixels=max_pixels))
    report = compile_segments(out, toolchain, CompileOptions(quantize="f16", check="none"), jobs=2)
    assert report.passed
    second = tmp_path / "second.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(90, 60, 3), dtype=np.uint8), "RGB").save(second)
    proof = verify(out, bmodel=report.bmodel, tpu_mlir=toolchain, prompt_length=3, new_tokens=3,
                   image=[None, second])
    assert proof.passed, proof.to_json()
    assert proof.vision["images"] == 2 and proof.hf_tokens == proof.onnx_tokens
    assert proof.vision["vit_cosine"] >= proof.vision["min_vit_cosine"]
