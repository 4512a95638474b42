"""The heads of CONTRACT.md: penalty_sample_head against a numpy reference, greedy top-1 inside lm_head."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tpugraph.contract.segments import ContractDims, SegmentKind, segment_specs
from tpugraph.export.exporter import DEFAULT_OPSET, ModelParts, export_segment
from tpugraph.source.checkpoint import ModelSource, load_config
from tpugraph.source.weights import WeightStore

SEQ = 16
VOCAB = 300
TOP_K = 50


def penalty_sample_reference(logits, input_ids, top_p, temperature, penalty, top_k=TOP_K, min_tokens_to_keep=1):
    """What the head must compute, written the plain way: (probs [1,K], token [1,K])."""
    logits = np.asarray(logits, dtype=np.float32)[0].copy()
    seen = np.unique(np.asarray(input_ids).reshape(-1))
    x = logits[seen]
    logits[seen] = np.where(x < 0, x * penalty, x / penalty)
    token = np.argsort(-logits, kind="stable")[:top_k]
    scaled = logits[token] / temperature
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    before = np.cumsum(p) - p
    keep = (before < top_p) | (np.arange(top_k) < min_tokens_to_keep)
    q = np.where(keep, p, 0.0)
    return (q / q.sum())[None].astype(np.float32), token[None]


def _dims(int_dtype="int32"):
    return ContractDims(seq=SEQ, hidden=48, kv_heads=2, head_dim=12, vocab=VOCAB, layers=2, int_dtype=int_dtype)


def _spec(kind, int_dtype="int32", **flags):
    return next(s for s in segment_specs(_dims(int_dtype), **flags) if s.kind == kind)


@pytest.fixture(scope="module")
def penalty_session():
    spec = _spec(SegmentKind.PENALTY_SAMPLE_HEAD, with_penalty_head=True)
    model = export_segment(None, spec, SEQ, "int32").model
    return model, ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run_penalty(session, logits, ids, top_p, temperature, penalty):
    return session.run(None, {
        "m_logits": logits.astype(np.float32), "input_ids": ids.astype(np.int32),
        "top_p": np.array([top_p], np.float32), "temperature": np.array([temperature], np.float32),
        "penalty": np.array([penalty], np.float32),
    })


CASES = [
    # (seed, top_p, temperature, penalty, logit shift)
    (0, 0.8, 0.7, 1.3, 0.0),
    (1, 0.95, 1.0, 1.1, 0.0),
    (2, 0.5, 1.5, 2.0, 0.0),
    (3, 1.0, 0.9, 1.0, 0.0),  # no penalty, no nucleus cut: a softmax over the top-K
    (4, 0.0, 1.0, 1.2, 0.0),  # nothing passes top-p: only the most likely token is kept
    (5, 0.9, 1.0, 1.5, -20.0),  # every logit negative: the penalty multiplies instead of dividing
    (6, 0.7, 0.8, 1.4, 20.0),
]


@pytest.mark.parametrize("seed,top_p,temperature,penalty,shift", CASES)
def test_penalty_sample_head_matches_numpy_reference(penalty_session, seed, top_p, temperature, penalty, shift):
    _, sess = penalty_session
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((1, VOCAB)) * 3 + shift).astype(np.float32)
    # A history with repeats, ids of the largest logits (so the penalty changes the ranking) and of
    # negative logits (so the x * penalty branch is taken).
    ids = rng.integers(0, VOCAB, size=(1, SEQ))
    ids[0, :4] = np.argsort(-logits[0])[:4]
    ids[0, 4:6] = np.argsort(logits[0])[:2]
    ids[0, 6:9] = ids[0, 0]
    probs, token = _run_penalty(sess, logits, ids, top_p, temperature, penalty)
    ref_probs, ref_token = penalty_sample_reference(logits, ids, top_p, temperature, penalty)
    np.testing.assert_array_equal(token, ref_token)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-6)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert (np.diff(probs[0][probs[0] > 0]) <= 1e-7).all()  # kept tokens stay in descending order


def test_penalty_changes_the_ranking(penalty_session):
    _, sess = penalty_session
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, 10], logits[0, 20], logits[0, 30] = 5.0, 4.0, -1.0
    ids = np.full((1, SEQ), 10)
    ids[0, 1] = 30
    _, plain = _run_penalty(sess, logits, ids, 1.0, 1.0, 1.0)
    _, penalised = _run_penalty(sess, logits, ids, 1.0, 1.0, 2.0)
    assert plain[0, :2].tolist() == [10, 20]
    assert penalised[0, :2].tolist() == [20, 10]  # 5 / 2 < 4
    assert 30 not in penalised[0, :3].tolist()  # -1 * 2: further down


def test_top_p_zero_keeps_only_the_best_token(penalty_session):
    _, sess = penalty_session
    logits = np.random.default_rng(5).standard_normal((1, VOCAB)).astype(np.float32)
    probs, token = _run_penalty(sess, logits, np.zeros((1, SEQ)), 0.0, 1.0, 1.0)
    assert probs[0, 0] == pytest.approx(1.0)
    assert np.count_nonzero(probs) == 1
    assert token[0, 0] == int(np.argmax(logits))


def test_penalty_sample_head_structure(penalty_session):
    model, sess = penalty_session
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [
        ("m_logits", [1, VOCAB]), ("input_ids", [1, SEQ]), ("top_p", [1]), ("temperature", [1]), ("penalty", [1])]
    assert [(o.name, o.shape, o.type) for o in sess.get_outputs()] == [
        ("probs", [1, TOP_K], "tensor(float)"), ("token", [1, TOP_K], "tensor(int32)")]
    ops = {n.op_type for n in model.graph.node}
    assert {"TopK", "GatherElements", "ScatterElements", "CumSum", "Softmax"} <= ops
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 17
    onnx.checker.check_model(model)


def test_penalty_sample_head_int64_tokens():
    spec = _spec(SegmentKind.PENALTY_SAMPLE_HEAD, "int64", with_penalty_head=True)
    model = export_segment(None, spec, SEQ, "int64").model
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[1].type == "tensor(int64)"
    assert sess.get_outputs()[1].type == "tensor(int64)"


def test_contract_without_penalty_head_by_default():
    kinds = [s.kind for s in segment_specs(_dims())]
    assert SegmentKind.PENALTY_SAMPLE_HEAD not in kinds
    assert kinds.count(SegmentKind.GREEDY_HEAD) == 1


def test_greedy_in_lm_head_drops_greedy_head():
    specs = segment_specs(_dims(), greedy_in_lm_head=True)
    assert SegmentKind.GREEDY_HEAD not in [s.kind for s in specs]
    lm = next(s for s in specs if s.kind == SegmentKind.LM_HEAD)
    assert [(t.name, t.shape, t.dtype) for t in lm.outputs] == [("token", (1, 1), "int32"),
                                                                ("m_logits", (1, VOCAB), "float32")]


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {}),
    ("gemma2", {"final_logit_softcapping": 3.0, "head_dim": 12, "initializer_range": 0.05}),
])
def test_greedy_in_lm_head_matches_lm_head_plus_greedy_head(make_model, model_type, extra):
    folder = make_model(model_type, vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, **extra)
    config, family = load_config(ModelSource(folder))
    parts = ModelParts(config, family, WeightStore(folder))
    plain = _spec(SegmentKind.LM_HEAD)
    fused = _spec(SegmentKind.LM_HEAD, greedy_in_lm_head=True)
    greedy = _spec(SegmentKind.GREEDY_HEAD)
    sess = {name: ort.InferenceSession(export_segment(parts, spec, SEQ, "int32").model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
            for name, spec in (("plain", plain), ("fused", fused), ("greedy", greedy))}
    assert [o.name for o in sess["fused"].get_outputs()] == ["token", "m_logits"]
    rng = np.random.default_rng(0)
    for _ in range(5):
        hidden = rng.standard_normal((1, 48)).astype(np.float32)
        (logits,) = sess["plain"].run(None, {"hidden_states": hidden})
        (token,) = sess["greedy"].run(None, {"m_logits": logits})
        fused_token, fused_logits = sess["fused"].run(None, {"hidden_states": hidden})
        np.testing.assert_allclose(fused_logits, logits, rtol=1e-6, atol=1e-6)
        assert fused_token.shape == (1, 1) and fused_token.dtype == np.int32
        assert int(fused_token[0, 0]) == int(token[0, 0]) == int(np.argmax(logits))


def test_opset_is_tpu_mlir_compatible():
    assert DEFAULT_OPSET <= 17
