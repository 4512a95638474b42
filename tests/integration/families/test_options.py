"""Export options that change the segments: --dtype, greedy top-1 inside lm_head, the penalty sampling head."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from family_harness import SEQ, describe, export_verify  # noqa: F401

GEMMA2 = dict(head_dim=16, query_pre_attn_scalar=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
              sliding_window=4, initializer_range=0.05)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("model_type,config", [("llama", {}), ("gemma2", GEMMA2), ("phi", dict(partial_rotary_factor=0.4))],
                         ids=["llama", "gemma2", "phi"])
def test_half_precision_weights_verify(export_verify, dtype, model_type, config):
    result = export_verify(model_type, options={"dtype": dtype}, **config)
    assert result.report.passed, describe(result.report)
    assert result.report.dtype == dtype
    # Reduced precision is checked with transformers' tokens fed back: a near-tie flip (allowed within the
    # dtype's error) must not send the two generations apart.
    assert result.report.teacher_forced
    # bfloat16 has no onnxruntime CPU kernels: the runtime falls back to onnx's reference evaluator.
    assert result.report.backend == ("onnx-reference" if dtype == "bfloat16" else "onnxruntime")
    block = onnx.load(str(result.out / "block_0.onnx"))
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype("float16")) if dtype == "float16" else onnx.TensorProto.BFLOAT16
    weights = [i for i in block.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == elem for i in weights)
    float_io = [v for v in (*block.graph.input, *block.graph.output)
                if v.type.tensor_type.elem_type not in (onnx.TensorProto.INT32, onnx.TensorProto.INT64)]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in float_io)  # I/O stays float32
    assert any(dtype in note for note in result.manifest.notes)


def test_greedy_in_lm_head_verifies_with_one_net_fewer(export_verify):
    result = export_verify("qwen2", options={"greedy_in_lm_head": True})
    assert result.report.passed, describe(result.report)
    names = [s.name for s in result.manifest.segments]
    assert "greedy_head" not in names and not (result.out / "greedy_head.onnx").exists()
    outputs = [(t.name, t.shape) for t in result.manifest.segment("lm_head").outputs]
    assert outputs == [("token", (1, 1)), ("m_logits", (1, 256))]


def test_penalty_head_is_exported_and_samples(export_verify):
    import onnxruntime as ort

    result = export_verify("llama", options={"penalty_head": True})
    assert result.report.passed, describe(result.report)
    entry = result.manifest.segment("penalty_sample_head")
    assert [t.name for t in entry.inputs] == ["m_logits", "input_ids", "top_p", "temperature", "penalty"]
    sess = ort.InferenceSession(str(result.out / entry.file), providers=["CPUExecutionProvider"])
    logits = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    probs, token = sess.run(None, {"m_logits": logits, "input_ids": np.zeros((1, SEQ), np.int32),
                                   "top_p": np.array([1.0], np.float32), "temperature": np.array([1.0], np.float32),
                                   "penalty": np.array([1.0], np.float32)})
    assert probs.shape == (1, 50) and token.shape == (1, 50)
    assert token[0, 0] == np.argmax(logits) and probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_manifest_notes_state_the_sliding_window_behaviour(export_verify):
    wide = export_verify("gemma2", **dict(GEMMA2, sliding_window=SEQ))
    narrow = export_verify("gemma2", **GEMMA2)
    (wide_note,) = wide.manifest.notes
    (narrow_note,) = narrow.manifest.notes
    assert f"SEQ={SEQ} <= {SEQ}" in wide_note and "exact" in wide_note
    assert f"SEQ={SEQ} > 4" in narrow_note and "position_ids" in narrow_note
    assert json.loads((narrow.out / "manifest.json").read_text())["notes"] == [narrow_note]


def test_nope_layers_are_noted(export_verify):
    result = export_verify("smollm3", no_rope_layers=[1, 0])
    assert result.manifest.segment("block_1").unused_inputs == ["position_ids"]
    assert any("block_1: position_ids" in n for n in result.manifest.notes)
