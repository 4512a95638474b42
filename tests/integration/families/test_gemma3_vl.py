"""Gemma 3 with images (family gemma3_vl): a tiny random-weight Gemma3ForConditionalGeneration built in code
(tests/vlm_models.py) exported with its vit segment (SigLIP at its fixed size + the pooling projector) and the Gemma 3
text blocks, then driven in onnxruntime like the TPU runtime with an image (the image tokens attending to each other
both ways in the prefill, a sliding window shorter than the image), against transformers' own generate."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from vlm_models import GEMMA3_TOKEN_IDS, build_gemma3

from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

SEQ = 40
SRC = str(Path(__file__).parents[3] / "src")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    folder = build_gemma3(tmp_path_factory.mktemp("gemma3-model"))
    out = tmp_path_factory.mktemp("gemma3-out")
    manifest = export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ, force=True))
    return folder, out, manifest


def test_vit_segment_contract(vlm):
    import onnx

    _, out, manifest = vlm
    assert manifest.model.family == "gemma3_vl" and manifest.segments[0].name == "vit"
    vit = onnx.load(str(out / "vit.onnx"))
    assert [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in vit.graph.input] == [
        ("pixel_values", [1, 3, 64, 64])]
    assert [d.dim_value for d in vit.graph.output[0].type.tensor_type.shape.dim] == [16, 64]
    assert manifest.segment("block_0").inputs[1].shape == (1, SEQ)  # plain positions: no mrope
    assert manifest.model.vision.tokens == 16 and manifest.model.vision.max_pixels == 64 * 64


def test_verify_passes_with_the_synthetic_image(vlm):
    _, out, _ = vlm
    report = verify(out, prompt_length=6, new_tokens=8)
    assert report.passed, report.to_json()
    assert report.hf_tokens == report.onnx_tokens and len(report.hf_tokens) == 8
    assert report.vision["image_tokens"] == 16 and report.vision["vit_cosine"] >= 0.9999


def test_the_bidirectional_image_mask_matters(vlm):
    """A causal mask over the image moves the logits: verify's match needs the host's bidirectional block."""
    import numpy as np

    from tpugraph.runtime.images import image_prompt_ids, load_image, vision_of
    from tpugraph.runtime.loop import SegmentRuntime
    from tpugraph.runtime.vision import encode_image

    _, out, manifest = vlm
    vision = vision_of(out, manifest)
    runtime = SegmentRuntime(out, manifest)
    image = load_image(out, manifest, None)
    ids = image_prompt_ids([10, 11, 12], vision, image, SEQ)
    assert ids[:2] == [GEMMA3_TOKEN_IDS["boi_token_index"], GEMMA3_TOKEN_IDS["image_token_index"]]
    assert ids[17] == GEMMA3_TOKEN_IDS["eoi_token_index"] and ids[18:] == [10, 11, 12]
    merged = encode_image(runtime, ids, image.pixel_values, image.grid, vision)
    logits = [runtime.generate(ids, 1, set(), image=m).logits[0] for m in (merged, replace(merged, bidirectional=False))]
    assert np.max(np.abs(logits[0] - logits[1])) > 1e-3


def test_max_pixels_other_than_the_fixed_size_is_one_line(vlm, tmp_path):
    folder, _, _ = vlm
    run = subprocess.run([sys.executable, "-m", "tpugraph", "export-and-optimize", str(folder), "-o",
                          str(tmp_path / "o"), "--seq-length", str(SEQ), "--max-pixels", "1024"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert run.returncode == 2 and "64x64 only" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
