"""Qwen3-VL (family qwen3_vl): a tiny random-weight model built in code (tests/vlm_models.py) exported with its vit
segment (learned position table interpolated by the host, deepstack outputs) and interleaved-mrope blocks, then
driven in onnxruntime like the TPU runtime with an image, against transformers' own generate and vision features."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from vlm_models import QWEN3_VL_MAX_PIXELS, TOKEN_IDS, build_qwen3_vl, check_image_turns

from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

SEQ = 48
SRC = str(Path(__file__).parents[3] / "src")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """The tiny model and its export through the default pass chain."""
    folder = build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl-model"))
    out = tmp_path_factory.mktemp("qwen3_vl-out")
    manifest = export_and_optimize(str(folder), out,
                                   ExportOptions(seq_length=SEQ, max_pixels=QWEN3_VL_MAX_PIXELS, force=True))
    return folder, out, manifest


def test_vit_segment_contract(vlm):
    import onnx

    _, out, manifest = vlm
    assert manifest.model.family == "qwen3_vl" and manifest.segments[0].name == "vit"
    patches = QWEN3_VL_MAX_PIXELS // (16 * 16)
    vit = onnx.load(str(out / "vit.onnx"))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in vit.graph.input}
    assert list(shapes) == ["pixel_values", "position_ids", "pos_idx", "pos_weight", "attention_mask"]
    assert shapes["pixel_values"] == [patches, 3 * 2 * 16 * 16] and shapes["position_ids"] == [patches, 2]
    assert shapes["pos_idx"] == [patches, 4] and shapes["pos_weight"] == [patches, 4, 1]
    assert shapes["attention_mask"] == [1, 1, patches, patches]
    outputs = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in vit.graph.output}
    assert outputs == {name: [patches // 4, 64] for name in ("vit_embeds", "deepstack_0", "deepstack_1")}
    assert manifest.segment("block_0").inputs[1].shape == (3, SEQ)
    vision = manifest.model.vision
    assert vision.deepstack_visual_indexes == [0, 1] and vision.num_position_embeddings == 16
    assert vision.window_size == 0 and vision.fullatt_block_indexes == [0, 1, 2]


def test_verify_passes_with_the_synthetic_image(vlm):
    _, out, _ = vlm
    report = verify(out, prompt_length=6, new_tokens=8)
    assert report.passed, report.to_json()
    assert report.hf_tokens == report.onnx_tokens and len(report.hf_tokens) == 8
    v = report.vision
    assert v["image"] == "synthetic" and v["vit_cosine"] >= 0.9999 and len(v["deepstack_cosines"]) == 2
    assert v["grid_thw"][0] == 1 and v["image_tokens"] == v["grid_thw"][1] * v["grid_thw"][2] // 4
    assert v["rope_delta"] < 0  # the image's tokens take fewer positions: mrope is in play


def test_deepstack_and_interleaved_positions_reach_the_language_model(vlm):
    """Dropping the deepstack rows moves the logits, and so do 1-D positions for the image: verify's token-for-token
    match needs both."""
    from tpugraph.runtime.images import image_prompt_ids, load_image, vision_of
    from tpugraph.runtime.loop import SegmentRuntime
    from tpugraph.runtime.vision import encode_image

    _, out, manifest = vlm
    vision = vision_of(out, manifest)
    runtime = SegmentRuntime(out, manifest)
    image = load_image(out, manifest, None)
    ids = image_prompt_ids([10, 11, 12], vision, image, SEQ)
    merged = encode_image(runtime, ids, image.pixel_values, image.grid, vision)
    variants = [merged, replace(merged, deepstack=()),
                replace(merged, positions=np.repeat(np.arange(len(ids))[None], 3, axis=0), delta=0)]
    logits = [runtime.generate(ids, 1, set(), image=m).logits[0] for m in variants]
    assert np.max(np.abs(logits[0] - logits[1])) > 1e-2
    assert np.max(np.abs(logits[0] - logits[2])) > 1e-2


@pytest.mark.parametrize("grid", [(1, 4, 6), (1, 8, 8), (1, 2, 10)])
def test_host_interpolation_matches_transformers(grid):
    import torch
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from tpugraph.runtime.vision import interpolation_taps

    ref_idx, ref_w = get_vision_interpolation_indices_and_weights(torch.tensor([grid]), num_grid_per_side=4,
                                                                  mode="bilinear", align_corners=True,
                                                                  spatial_merge_size=2)
    idx, w = interpolation_taps(grid, 2, 4)
    assert idx.tolist() == ref_idx.tolist()
    assert np.array_equal(w, ref_w.numpy())


def test_a_bad_image_is_one_line(vlm, tmp_path):
    _, out, _ = vlm
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    import os

    run = subprocess.run([sys.executable, "-m", "tpugraph", "verify", str(out), "--image", str(junk)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert run.returncode == 2 and "not an image" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_text_prompt_on_the_vlm_output(vlm):
    """Without an image the blocks get three equal position rows: the plain rotary, as transformers does."""
    from tpugraph.contract.manifest import read_manifest
    from tpugraph.proof.verify import hf_greedy
    from tpugraph.runtime.loop import SegmentRuntime

    _, out, manifest = vlm
    ids = [10, 20, 30, TOKEN_IDS["vision_end_token_id"] + 40]
    trace = SegmentRuntime(out, read_manifest(out)).generate(ids, 5, set())
    hf_tokens, hf_logits = hf_greedy(Path(manifest.model.source.path), ids, 5, set())
    assert trace.tokens == hf_tokens
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(hf_logits, trace.logits)) < 1e-3


def test_verify_passes_with_two_images(vlm, tmp_path):
    """Two images of different grids: each through the vit in turn, their deepstack rows added at their own
    tokens, the 3-D positions over both."""
    from PIL import Image

    _, out, _ = vlm
    rng = np.random.default_rng(3)
    images = []
    for name, (w, h) in (("a.png", (120, 90)), ("b.png", (64, 100))):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB").save(tmp_path / name)
        images.append(tmp_path / name)
    report = verify(out, prompt_length=4, new_tokens=6, image=images)
    assert report.passed, report.to_json()
    assert report.vision["images"] == 2 and len(report.vision["deepstack_cosines"]) == 2


def test_history_kv_keeps_the_cache_across_image_turns(vlm, tmp_path):
    """--history-kv: a chat whose first and third turns bring an image keeps its KV cache, each turn prefilling
    only its new tokens (block_kv_i with the new image's rows, 3-D positions and deepstack rows), and answers as
    transformers on the whole conversation."""
    from PIL import Image

    folder, _, _ = vlm
    out = tmp_path / "kv"
    export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ + 16, max_pixels=QWEN3_VL_MAX_PIXELS,
                                                        history_kv=True, force=True))
    rng = np.random.default_rng(4)
    files = []
    for name, (w, h) in (("a.png", (100, 70)), ("b.png", (60, 60))):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB").save(tmp_path / name)
        files.append(tmp_path / name)
    check_image_turns(out, folder, files)
