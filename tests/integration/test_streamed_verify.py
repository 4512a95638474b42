"""Verifying models too big for memory: the fp32 reference with streamed layer weights, and segments loaded
per run instead of kept. Both must give exactly what the whole-model path gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_LLAMA, build_model_dir

from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof import reference
from tpugraph.proof.verify import hf_greedy, verify
from tpugraph.runtime.loop import SegmentRuntime

SEQ = 24
PROMPT = [5, 17, 99, 3, 42, 7]


@pytest.fixture(scope="module", params=["untied", "tied"])
def exported(request, tmp_path_factory):
    cfg = dict(TINY_LLAMA, tie_word_embeddings=request.param == "tied")
    model_dir = build_model_dir(tmp_path_factory.mktemp(f"m-{request.param}"), "llama", seed=11, **cfg)
    out = tmp_path_factory.mktemp("out") / "out"
    export_and_optimize(str(model_dir), out, ExportOptions(seq_length=SEQ))
    return model_dir, out


def test_streamed_reference_generates_what_the_whole_model_does(exported):
    model_dir, _ = exported
    full_tokens, full_logits = hf_greedy(model_dir, PROMPT, 6, set(), stream=False)
    tokens, logits = hf_greedy(model_dir, PROMPT, 6, set(), stream=True)
    assert tokens == full_tokens
    for a, b in zip(logits, full_logits, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_streamed_reference_holds_only_the_non_layer_weights_between_forwards(exported):
    model_dir, _ = exported
    model = reference.load_streamed(model_dir)
    real = {n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type != "meta"}
    assert real and not any(n.startswith("model.layers.") for n in real)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= real
    with torch.no_grad():
        model(torch.tensor([PROMPT]))
    # Each layer gave its weights back after its forward.
    assert all(p.device.type == "meta" for n, p in model.named_parameters() if n.startswith("model.layers."))


def test_segments_loaded_per_run_give_the_same_generation(exported):
    _, out = exported
    kept = SegmentRuntime(out)
    streamed = SegmentRuntime(out, keep_bytes=0)
    a = kept.generate(PROMPT, 5)
    b = streamed.generate(PROMPT, 5)
    assert a.tokens == b.tokens
    for x, y in zip(a.logits, b.logits, strict=True):
        np.testing.assert_array_equal(x, y)
    assert streamed.backend._sessions == {} and len(kept.backend._sessions) > 0


def test_should_stream_follows_the_memory_available(exported, monkeypatch):
    model_dir, _ = exported
    need = reference.float32_bytes(reference.WeightStore(model_dir))
    monkeypatch.setattr(reference, "available_memory", lambda: need)  # the model is all there is
    assert reference.should_stream(model_dir)
    monkeypatch.setattr(reference, "available_memory", lambda: 4 * need)
    assert not reference.should_stream(model_dir)


def test_verify_passes_with_the_streamed_reference(exported):
    _, out = exported
    report = verify(out, prompt_length=6, new_tokens=5, seed=2, stream_reference=True)
    assert report.passed and report.tokens_equal
