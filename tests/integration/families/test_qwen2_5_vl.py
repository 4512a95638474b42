"""Qwen2.5-VL (family qwen2_5_vl): a tiny random-weight model built in code (tests/vlm_models.py) exported with the
vit segment and mrope blocks, then driven in onnxruntime like the TPU runtime with an image, against transformers'
own generate and vision features."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vlm_models import MAX_PIXELS, TOKEN_IDS, build_qwen2_5_vl

from tpugraph.contract.manifest import read_manifest
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

SEQ = 48
SRC = str(Path(__file__).parents[3] / "src")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """The tiny model and its export through the default pass chain."""
    folder = build_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl-model"))
    out = tmp_path_factory.mktemp("qwen2_5_vl-out")
    manifest = export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ, max_pixels=MAX_PIXELS, force=True))
    return folder, out, manifest


def picture(path: Path, width: int, height: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB").save(path)
    return path


def test_vit_segment_contract(vlm):
    import onnx

    _, out, manifest = vlm
    assert manifest.model.family == "qwen2_5_vl" and manifest.model.architecture == \
        "Qwen2_5_VLForConditionalGeneration"
    assert manifest.segments[0].name == "vit"  # the runtime's first net
    patches = MAX_PIXELS // (14 * 14)
    vit = onnx.load(str(out / "vit.onnx"))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in vit.graph.input}
    assert [v.name for v in vit.graph.input if v.name in shapes][:5] == [
        "pixel_values", "position_ids", "full_attn_mask", "window_attn_mask", "reverse_index"]
    assert shapes["pixel_values"] == [patches, 3 * 2 * 14 * 14] and shapes["position_ids"] == [patches, 2]
    assert shapes["full_attn_mask"] == shapes["window_attn_mask"] == [1, 1, patches, patches]
    assert shapes["reverse_index"] == [patches // 4]
    assert [d.dim_value for d in vit.graph.output[0].type.tensor_type.shape.dim] == [patches // 4, 64]
    block = manifest.segment("block_0")
    assert block.inputs[1].shape == (3, SEQ)  # mrope positions
    assert manifest.segment("block_cache_0").inputs[1].shape == (3, 1)
    assert manifest.model.vision.max_pixels == MAX_PIXELS and manifest.model.mrope_section == [2, 3, 3]
    assert "preprocessor_config.json" in manifest.model.tokenizer.files


def test_verify_passes_with_the_synthetic_image(vlm):
    _, out, _ = vlm
    report = verify(out, prompt_length=6, new_tokens=8)
    assert report.passed, report.to_json()
    assert report.hf_tokens == report.onnx_tokens and len(report.hf_tokens) == 8
    assert report.vision["image"] == "synthetic" and report.vision["vit_cosine"] >= 0.9999
    assert report.vision["grid_thw"] == [1, 6, 8] and report.vision["image_tokens"] == 12
    assert report.vision["rope_delta"] < 0  # the image's 12 tokens take 4 positions: mrope is in play


def test_verify_resizes_a_large_image_file_within_max_pixels(vlm, tmp_path):
    _, out, _ = vlm
    big = picture(tmp_path / "big.png", 640, 360, seed=1)  # 16x the vit's pixels
    report = verify(out, prompt_length=5, new_tokens=6, image=big)
    assert report.passed, report.to_json()
    t, h, w = report.vision["grid_thw"]
    assert t * h * w * 14 * 14 <= MAX_PIXELS and w > h  # resized, aspect kept


def test_the_image_and_its_positions_reach_the_language_model(vlm, tmp_path):
    """The vit rows are merged (another image moves the logits) and the 3-D positions matter (the same rows with
    1-D positions move them too): verify's token-for-token match is not by luck."""
    from dataclasses import replace

    from tpugraph.runtime.images import image_prompt_ids, load_image, vision_of
    from tpugraph.runtime.loop import SegmentRuntime
    from tpugraph.runtime.vision import encode_image

    _, out, manifest = vlm
    vision = vision_of(out, manifest)
    runtime = SegmentRuntime(out, manifest)
    logits = []
    for seed in (2, 3):
        image = load_image(out, manifest, picture(tmp_path / f"{seed}.png", 90, 90, seed=seed))
        ids = image_prompt_ids([10, 11, 12], vision, image, SEQ)
        merged = encode_image(runtime, ids, image.pixel_values, image.grid, vision)
        logits.append(runtime.generate(ids, 1, set(), image=merged).logits[0])
    flat = replace(merged, positions=np.repeat(np.arange(len(ids))[None], 3, axis=0), delta=0)
    logits.append(runtime.generate(ids, 1, set(), image=flat).logits[0])
    assert np.max(np.abs(logits[0] - logits[1])) > 1e-2
    assert np.max(np.abs(logits[1] - logits[2])) > 1e-2


def test_host_positions_match_transformers():
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    from tpugraph.runtime.vision import rope_index, window_index

    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:
        pytest.skip("this transformers keeps the window index inside the vision model (no vision_utils); the "
                    "verify tests check it end to end")

    grid = (1, 6, 8)
    order, lengths = window_index(grid, 2, 56, 14)
    ref_order, ref_cu = get_vision_window_index(torch.tensor([grid]), spatial_merge_size=2, window_size=56,
                                                patch_size=14)
    assert order.tolist() == ref_order.tolist()
    assert np.cumsum([0] + lengths).tolist() == ref_cu.tolist()
    ids = [3, 9] + [TOKEN_IDS["image_token_id"]] * 12 + [10, 11, 12]
    config = Qwen2_5_VLConfig(text_config={"num_hidden_layers": 1}, **TOKEN_IDS)
    t = torch.tensor([ids])
    ref, delta = Qwen2_5_VLModel.get_rope_index(
        type("M", (), {"config": config, "get_vision_position_ids": Qwen2_5_VLModel.get_vision_position_ids})(),
        t, mm_token_type_ids=(t == TOKEN_IDS["image_token_id"]).int(), image_grid_thw=torch.tensor([grid]))
    positions, ours = rope_index(ids, TOKEN_IDS["image_token_id"], grid, 2)
    assert positions.tolist() == ref[:, 0].tolist() and ours == int(delta)


def test_host_positions_of_two_images_match_transformers():
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    from tpugraph.runtime.vision import rope_index

    grids = [(1, 6, 8), (1, 4, 2)]
    image = TOKEN_IDS["image_token_id"]
    ids = [3, 9] + [image] * 12 + [10, 11] + [image] * 2 + [12]
    config = Qwen2_5_VLConfig(text_config={"num_hidden_layers": 1}, **TOKEN_IDS)
    t = torch.tensor([ids])
    ref, delta = Qwen2_5_VLModel.get_rope_index(
        type("M", (), {"config": config, "get_vision_position_ids": Qwen2_5_VLModel.get_vision_position_ids})(),
        t, mm_token_type_ids=(t == image).int(), image_grid_thw=torch.tensor(grids))
    positions, ours = rope_index(ids, image, grids, 2)
    assert positions.tolist() == ref[:, 0].tolist() and ours == int(delta)


def test_verify_passes_with_two_images(vlm, tmp_path):
    _, out, _ = vlm
    images = [picture(tmp_path / "a.png", 120, 100, seed=5), picture(tmp_path / "b.png", 60, 90, seed=6)]
    report = verify(out, prompt_length=4, new_tokens=6, image=images)
    assert report.passed, report.to_json()
    grids = report.vision["grid_thw"]
    assert len(grids) == 2 and grids[0] != grids[1] and report.vision["images"] == 2
    assert report.vision["image_tokens"] == sum(t * h * w // 4 for t, h, w in grids)


def test_chat_with_two_images_then_a_text_turn(vlm, tmp_path):
    """chat's /image twice, then a turn without: each reply is transformers' generate on the whole conversation
    with both images."""
    from tpugraph.proof.reference import load_full
    from tpugraph.proof.vision_verify import hf_image_generate
    from tpugraph.runtime.chat import ChatSession
    from tpugraph.runtime.images import image_messages_ids

    folder, out, _ = vlm
    session = ChatSession(out, max_new_tokens=3)
    model = load_full(folder)
    try:
        assert session.attach(picture(tmp_path / "a.png", 80, 60, seed=7)) == 1
        assert session.attach(picture(tmp_path / "b.png", 50, 50, seed=8)) == 2
        for text in ("w3 w4", "w5"):
            reply = session.ask(text)
            assert not session.pending and len(session.images) == 2
            ids = image_messages_ids(session.tokenizer, session.conversation.messages[:-1], session.vision,
                                     session.images, session.seq)
            assert ids.count(TOKEN_IDS["vision_start_token_id"]) == 2 and reply.conversation_tokens == len(ids)
            hf_tokens, _ = hf_image_generate(model, ids, session.images, TOKEN_IDS["image_token_id"], 3, set())
            assert reply.tokens == hf_tokens
    finally:
        session.close()


def test_chat_command_takes_image_lines(vlm, tmp_path):
    """`/image FILE` twice, then a turn; a bad /image line is one `sorry:` line and the chat goes on."""
    from cli_harness import runner

    from tpugraph.cli import app

    _, out, _ = vlm
    a, b = picture(tmp_path / "a.png", 80, 60, seed=9), picture(tmp_path / "b.png", 40, 70, seed=10)
    result = runner.invoke(app, ["chat", str(out), "--max-new-tokens", "2"],
                           input=f"/image {a}\n/image {tmp_path / 'nope.png'}\n/image\n/image {b}\nw3 w4\nw5\n")
    assert result.exit_code == 0, result.output
    assert "[1 image(s) for the next turn]" in result.output and "[2 image(s) for the next turn]" in result.output
    assert "sorry: 'nope.png' not found" in result.output.replace(str(tmp_path) + "/", "")
    assert "sorry: /image needs a file" in result.output
    assert result.output.count("stop:") == 2 and "Traceback" not in result.output


def _cli(*args: str):
    import os

    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "tpugraph", *args], capture_output=True, text=True, env=env)


def test_run_with_an_image_and_the_bad_cases(vlm, tmp_path, make_model):
    _, out, _ = vlm
    image = picture(tmp_path / "cat.png", 120, 100, seed=4)
    ok = _cli("run", str(out), "--image", str(image), "--prompt", "w3 w4 w5", "--chat", "--max-new-tokens", "4",
              "--json")
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert len(result["tokens"]) == 4 and result["prompt_ids"].count(TOKEN_IDS["image_token_id"]) > 1
    plain = _cli("run", str(out), "--image", str(image), "--prompt", "w3 w4", "--max-new-tokens", "2", "--json")
    assert plain.returncode == 0, plain.stderr
    ids = json.loads(plain.stdout)["prompt_ids"]  # no --chat: the bracketed image goes in front of the prompt
    assert ids[0] == TOKEN_IDS["vision_start_token_id"] and ids[-3] == TOKEN_IDS["vision_end_token_id"]
    checked = _cli("verify", str(out), "--image", str(image), "--prompt-length", "3", "--new-tokens", "3")
    assert checked.returncode == 0 and "PASS" in checked.stdout and "vit cosine" in checked.stdout, checked.stderr
    missing = _cli("run", str(out), "--image", str(tmp_path / "nope.png"), "--prompt", "w3")
    assert missing.returncode == 2 and "--image" in missing.stderr and "not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    unreadable = _cli("run", str(out), "--image", str(junk), "--prompt", "w3")
    assert unreadable.returncode == 2 and "not an image" in unreadable.stderr
    placeholder = _cli("run", str(out), "--prompt", "<|vision_start|> <|image_pad|> <|vision_end|> w3")
    assert placeholder.returncode == 2 and "no image was given" in placeholder.stderr
    assert len(placeholder.stderr.strip().splitlines()) == 1


def test_an_image_for_a_text_only_output_is_one_line(make_model, tmp_path):
    from family_harness import TINY

    text_out = tmp_path / "text"
    export_and_optimize(str(make_model("llama", **TINY)), text_out, ExportOptions(seq_length=16, passes=[]))
    image = picture(tmp_path / "x.png", 32, 32, seed=0)
    refused = _cli("run", str(text_out), "--image", str(image), "--prompt-ids", "3,4")
    assert refused.returncode == 2 and "text-only" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("max_pixels,message", [(1000, "multiple of"), (112 * 112 * 4, "no room for a prompt")])
def test_bad_max_pixels_is_refused(vlm, tmp_path, max_pixels, message):
    from tpugraph.errors import UsageError

    folder, _, _ = vlm
    with pytest.raises(UsageError, match=message):
        export_and_optimize(str(folder), tmp_path / "o", ExportOptions(seq_length=SEQ, max_pixels=max_pixels))


def test_text_prompt_on_the_vlm_output(vlm):
    """Without an image the blocks get three equal position rows: the plain rotary, as transformers does."""
    _, out, manifest = vlm
    from tpugraph.proof.verify import hf_greedy
    from tpugraph.runtime.loop import SegmentRuntime

    ids = [10, 20, 30, 40]
    runtime = SegmentRuntime(out, read_manifest(out))
    trace = runtime.generate(ids, 5, set())
    hf_tokens, hf_logits = hf_greedy(Path(manifest.model.source.path), ids, 5, set())
    assert trace.tokens == hf_tokens
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(hf_logits, trace.logits)) < 1e-3
