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
import numpy as np
from vlm_models import GEMMA3_TOKEN_IDS, GEMMA3_VISION, GEMMA3_WORDS, build_gemma3, check_image_turns

from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

SEQ = 80  # room for two images (18 tokens each) or one with two pan-and-scan crops
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


def test_prompt_ids_equal_the_processors(vlm):
    """The ids run feeds for a text prompt and its images are Gemma3Processor's: the blank lines around each image
    block, several images, the chat template, and pan-and-scan's crops with the processor's sentence."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from tpugraph.runtime.images import image_chat_messages, process_image, synthetic_image, text_prompt_ids, vision_of
    from tpugraph.source.tokenizer import load_output_tokenizer

    _, out, manifest = vlm
    tokenizer = load_output_tokenizer(out, manifest)
    vision = vision_of(out, manifest)
    pictures = [synthetic_image(), synthetic_image(60, 56)]  # 100x80, 60x56: 2 and 0 crops with pan-and-scan
    side = GEMMA3_VISION["image_size"]
    for settings, crops in (({}, [0, 0]), ({"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 16}, [2, 0])):
        image_processor = Gemma3ImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                                                  image_std=[0.5] * 3, **settings)
        processor = Gemma3Processor(image_processor, tokenizer, image_seq_length=vision.tokens)
        images = [process_image(image_processor, p, vision, "picture") for p in pictures]
        assert [image.crops for image in images] == crops
        for text, count, chat in (("w5 <start_of_image> w6 w7", 1, False),
                                  ("w5 <start_of_image> w6 <start_of_image> w7", 2, False), ("w5 w6", 2, True)):
            ours = text_prompt_ids(tokenizer, text, chat, vision, images[:count], 10_000)
            if chat:
                rendered = tokenizer.apply_chat_template(image_chat_messages(text, count), tokenize=False,
                                                         add_generation_prompt=True)
                theirs = processor(text=rendered, images=pictures[:count], add_special_tokens=False,
                                   return_tensors="np", **settings)
            else:  # the processor takes pan-and-scan as a call argument (its own default: off)
                theirs = processor(text=text, images=pictures[:count], return_tensors="np", **settings)
            assert ours == theirs["input_ids"][0].tolist(), (settings, text)
            assert ours.count(GEMMA3_WORDS.index("\n\n")) >= 2 * count and ours.count(1) == 1  # blank lines, one BOS
            pixels = np.concatenate([image.pixel_values for image in images[:count]])
            assert np.array_equal(pixels, theirs["pixel_values"])


def picture(path: Path, width: int, height: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB").save(path)
    return path


def test_verify_passes_with_two_images(vlm, tmp_path):
    """Each image through the vit in turn, each block bidirectional within itself only (a later image is not
    seen by an earlier one), against transformers' generate with both."""
    _, out, _ = vlm
    images = [picture(tmp_path / "a.png", 90, 60, seed=1), picture(tmp_path / "b.png", 50, 70, seed=2)]
    report = verify(out, prompt_length=4, new_tokens=6, image=images)
    assert report.passed, report.to_json()
    assert report.vision["images"] == 2 and report.vision["image_tokens"] == 32
    assert report.prompt.count(GEMMA3_TOKEN_IDS["boi_token_index"]) == 2


def test_verify_passes_with_pan_and_scan_crops(vlm, tmp_path):
    """OUT's image processor with pan-and-scan on: the image and its crops each through the vit, one block each."""
    import json
    import shutil

    _, out, _ = vlm
    crops_out = tmp_path / "out"
    shutil.copytree(out, crops_out)
    config = crops_out / "tokenizer" / "preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "do_pan_and_scan": True,
                                  "pan_and_scan_min_crop_size": 16}))
    report = verify(crops_out, prompt_length=4, new_tokens=6)  # the synthetic 100x80 picture: two crops
    assert report.passed, report.to_json()
    assert report.vision["crops"] == [2] and report.vision["image_tokens"] == 48


def test_images_and_placeholders_that_differ_are_one_line(vlm, tmp_path):
    from tpugraph.errors import UsageError
    from tpugraph.runtime.images import load_image, text_prompt_ids, vision_of
    from tpugraph.source.tokenizer import load_output_tokenizer

    _, out, manifest = vlm
    images = [picture(tmp_path / "a.png", 40, 40, seed=3), picture(tmp_path / "b.png", 40, 40, seed=4)]
    from cli_harness import one_line, run

    one_line(*run("run", out, "--prompt", "w5 <start_of_image> w6", "--image", images[0], "--image", images[1]), 2,
             "1 image placeholder(s) for 2 image(s)")
    with pytest.raises(UsageError, match="2 image placeholder"):  # fewer images than placeholders
        text_prompt_ids(load_output_tokenizer(out, manifest), "<start_of_image> w5 <start_of_image>", False,
                        vision_of(out, manifest), [load_image(out, manifest, images[0])], SEQ)


def test_history_kv_keeps_the_cache_across_image_turns(vlm, tmp_path):
    """--history-kv: the image block of a later turn is prefilled on the history (block_kv_i), bidirectional
    within itself in the chunk's own mask columns, and each turn answers as transformers on the whole
    conversation."""
    folder, _, _ = vlm
    out = tmp_path / "kv"
    export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ, history_kv=True, force=True))
    files = [picture(tmp_path / "a.png", 70, 50, seed=5), picture(tmp_path / "b.png", 40, 60, seed=6)]
    check_image_turns(out, folder, files)
