"""Any mask value a runtime writes (issue #12, item 7): every block gives the same result for a mask value of
-10000 and for anything below it down to the lowest finite value of its float type, prefill and decode alike.

LLM-TPU's demos write "masked" as a raw 16-bit pattern: 0xF0E2 (-10000 as F16) read by a BF16 net is about
-5.5e29. The blocks clamp the mask to -10000 in the graph, so no intermediate overflows (an F16 cast of
-3.4e38 is -inf, and a fully masked padding row then gives NaN that the next layer spreads everywhere).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tpugraph.contract.segments import MASK_VALUE, decode_inputs, mask_value_as_read, prefill_inputs
from tpugraph.export.pipeline import ExportOptions, export_and_optimize

SEQ = 8
F16_PATTERN, BF16_PATTERN = 0xF0E2, 0xC61C
LOWEST_F32 = float(np.finfo(np.float32).min)


def test_mask_patterns_read_as_each_float_type():
    assert mask_value_as_read(F16_PATTERN, "f16") == -10000.0
    assert mask_value_as_read(BF16_PATTERN, "bf16") == -9984.0
    as_bf16 = mask_value_as_read(F16_PATTERN, "bf16")
    assert -5.6e29 < as_bf16 < -5.5e29
    assert mask_value_as_read(F16_PATTERN, "f32") == -10000.0  # an F32 net gets the value itself


@pytest.fixture(scope="module", params=["float32", "float16"])
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"mask-{request.param}") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ, dtype=request.param))
    return request.param, out


def _session(out, name):
    return ort.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def _masked_like(mask: np.ndarray, value: float) -> np.ndarray:
    return np.where(mask < 0, np.float32(value), mask).astype(np.float32)


@pytest.mark.parametrize("value", [mask_value_as_read(F16_PATTERN, "bf16"), -65504.0, LOWEST_F32])
def test_blocks_give_the_same_result_for_any_mask_value_below_minus_10000(exported, value):
    dtype, out = exported
    rng = np.random.default_rng(0)
    n = 5  # rows n..SEQ-1 are fully masked padding: where an overflow shows first
    ids, pos, mask = prefill_inputs(list(range(3, 3 + n)), SEQ)
    assert (mask == MASK_VALUE).sum() > 0
    block = _session(out, "block_0")
    states = rng.standard_normal(block.get_inputs()[0].shape).astype(np.float32)
    names = [i.name for i in block.get_inputs()]
    want = block.run(None, dict(zip(names, [states, pos.astype(np.int32), mask])))
    got = block.run(None, dict(zip(names, [states, pos.astype(np.int32), _masked_like(mask, value)])))
    for w, g in zip(want, got):
        assert np.isfinite(g).all(), f"{dtype} block_0 with mask {value:g}: not finite"
        np.testing.assert_array_equal(g, w)

    _, dpos, dmask = decode_inputs(7, n, SEQ)
    cache = _session(out, "block_cache_0")
    hk = rng.standard_normal(cache.get_inputs()[3].shape).astype(np.float32)
    hv = rng.standard_normal(cache.get_inputs()[4].shape).astype(np.float32)
    hk[0, n:] = 1e4  # garbage history rows, as a runtime's buffers hold them
    names = [i.name for i in cache.get_inputs()]
    dstates = states[:, :1]
    want = cache.run(None, dict(zip(names, [dstates, dpos.astype(np.int32), dmask, hk, hv])))
    got = cache.run(None, dict(zip(names, [dstates, dpos.astype(np.int32), _masked_like(dmask, value), hk, hv])))
    for w, g in zip(want, got):
        assert np.isfinite(g).all(), f"{dtype} block_cache_0 with mask {value:g}: not finite"
        np.testing.assert_array_equal(g, w)


def test_the_mask_check_of_a_conversation_compares_the_first_turn():
    """verify --turns N --bmodel drives the first turn again with the other mask encoding: its tokens are held
    against that turn's, not against the whole conversation's."""
    from tpugraph.proof.verify import VerifyReport

    report = VerifyReport(prompt=[1, 2], hf_tokens=[5, 6, 7, 8], onnx_tokens=[5, 6, 7, 8], dtype="bmodel-bf16",
                          backend="bmodel")
    report.mask_check = {"pattern": "0xF0E2", "value": -5.6e29, "tokens": [5, 6], "expected": [5, 6]}
    assert report.mask_check_ok
    report.mask_check = {"pattern": "0xF0E2", "value": -5.6e29, "tokens": [5, 9], "expected": [5, 6]}
    assert not report.mask_check_ok
