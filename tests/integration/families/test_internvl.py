"""InternVL (family internvl): a tiny random-weight InternVLForConditionalGeneration built in code (tests/vlm_models.py)
exported with its vit segment (one 28x28 tile: InternViT + pixel shuffle + MLP projector) and Qwen2 blocks, then
driven in onnxruntime like the TPU runtime with an image cut into tiles by the model's own processor (each tile
through the vit, the rows placed tile after tile between <img> and </img>), against transformers' own generate."""

from __future__ import annotations

import pytest
from vlm_models import INTERNVL_TOKEN_IDS, INTERNVL_WORDS, build_internvl

from tpugraph.errors import ModelError
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

SEQ = 40


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    folder = build_internvl(tmp_path_factory.mktemp("internvl-model"))
    out = tmp_path_factory.mktemp("internvl-out")
    manifest = export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ, force=True))
    return folder, out, manifest


def test_vit_segment_contract(vlm):
    import onnx

    _, out, manifest = vlm
    assert manifest.model.family == "internvl" and manifest.segments[0].name == "vit"
    vit = onnx.load(str(out / "vit.onnx"))
    assert [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in vit.graph.input] == [
        ("pixel_values", [1, 3, 28, 28])]
    # 4x4 patches, pixel-shuffled 2x2: 4 rows of the language model's width per tile
    assert [d.dim_value for d in vit.graph.output[0].type.tensor_type.shape.dim] == [4, 64]
    assert {n.domain for n in vit.graph.node} == {""}  # no onnxruntime contrib op (fused Attention)
    assert manifest.segment("block_0").inputs[1].shape == (1, SEQ)  # plain positions: no mrope
    # the brackets come from the tokenizer, the placeholder from the config
    assert manifest.model.vision.token_ids == INTERNVL_TOKEN_IDS


def test_verify_passes_with_the_synthetic_image_in_five_tiles(vlm):
    _, out, _ = vlm
    report = verify(out, prompt_length=6, new_tokens=8)
    assert report.passed, report.to_json()
    assert report.hf_tokens == report.onnx_tokens and len(report.hf_tokens) == 8
    # 100x80 with at most 4 tiles: 2x2 and the thumbnail, 4 rows each
    assert report.vision["grid_thw"][0] == 5 and report.vision["image_tokens"] == 20
    assert report.vision["vit_cosine"] >= 0.9999


def test_a_square_image_is_one_tile_and_a_wide_one_a_row_of_tiles(vlm, tmp_path):
    from PIL import Image

    from tpugraph.runtime.images import image_prompt_ids, load_image, vision_of

    _, out, manifest = vlm
    vision = vision_of(out, manifest)
    # a small square: 1x1 (no thumbnail; a larger one would take 2x2); three times wider than high: 3x1 + thumbnail
    for size, tiles in (((30, 30), 1), ((120, 40), 4)):
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (200, 30, 90)).save(path)
        image = load_image(out, manifest, path)
        assert image.pixel_values.shape == (tiles, 3, 28, 28)
        start, end, context = (INTERNVL_TOKEN_IDS[k] for k in ("start", "end", "image"))
        # the placeholder alone becomes <img> <IMG_CONTEXT> x rows </img>, where it stood
        assert image_prompt_ids([10, context, 11], vision, image, SEQ) == [10, start] + [context] * 4 * tiles + [
            end, 11]
    report = verify(out, image=path, prompt_length=4, new_tokens=4)
    assert report.passed and report.vision["image_tokens"] == 16, report.to_json()


def test_a_tokenizer_without_the_image_brackets_is_one_line(tmp_path):
    folder = build_internvl(tmp_path / "model", brackets=False)
    with pytest.raises(ModelError, match=f"no token '{INTERNVL_WORDS[5]}'") as err:
        export_and_optimize(str(folder), tmp_path / "out", ExportOptions(seq_length=SEQ))
    assert "\n" not in str(err.value)


def test_tiles_of_another_size_than_the_vit_are_one_line(vlm):
    """InternVL's own path: a processor that is not the model's (tiles of another size) is refused before the vit."""
    import numpy as np

    from tpugraph.errors import UsageError
    from tpugraph.runtime.images import vision_of
    from tpugraph.runtime.vision import vit_runs

    _, out, manifest = vlm
    vision = vision_of(out, manifest)
    assert len(vit_runs(np.zeros((3, 3, 28, 28), np.float32), (3, 4, 4), vision)) == 3
    with pytest.raises(UsageError, match=r"the vit takes tiles \[n, 3, 28, 28\]") as err:
        vit_runs(np.zeros((2, 3, 32, 32), np.float32), (2, 4, 4), vision)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("attr,value", [("vision_feature_layer", -2), ("vision_feature_select_strategy", "full"),
                                        ("downsample_ratio", 0.3)])
def test_what_the_vit_does_not_export_is_refused_with_the_reason(vlm, attr, value):
    from transformers import AutoConfig

    from tpugraph.errors import UnsupportedModelError
    from tpugraph.export.vision import vision_dims
    from tpugraph.source.families import family_by_name

    config = AutoConfig.from_pretrained(str(vlm[0]))
    assert vision_dims(config, family_by_name("internvl"), None).tokens == 4
    setattr(config, attr, value)
    with pytest.raises(UnsupportedModelError, match=f"{attr}={value!r}" if attr != "downsample_ratio" else
                       "downsample_ratio=0.3") as err:
        vision_dims(config, family_by_name("internvl"), None)
    assert "\n" not in str(err.value) and err.value.exit_code == 4
