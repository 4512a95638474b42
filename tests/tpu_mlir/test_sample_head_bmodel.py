"""The current runtime's sample_head compiled by tpu-mlir (F32, --dynamic, io_alone) and run on the cmodel against the
numpy reference of tests/integration/test_sample_head.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sample_reference import sample_reference

from tpugraph.contract.manifest import read_manifest
from tpugraph.export.pipeline import ExportOptions, export_and_optimize

SEQ = 16


@pytest.fixture(scope="module")
def sampled_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample-head") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ, sample_head="current"))
    return out


@pytest.mark.slow
def test_sample_head_compiles_with_tpu_mlir_and_matches_on_the_cmodel(sampled_out, tmp_path, toolchain):
    venv = toolchain
    """sample_head alone (an OUT whose manifest lists only it), deployed F32 --dynamic --addr_mode io_alone
    with the tools' compare on test data, then run on the cmodel against the numpy reference."""
    from tpugraph.compiler import CompileOptions, compile_segments
    from tpugraph.export.compare_inputs import write_test_data
    from tpugraph.runtime.backends.bmodel_backend import BmodelBackend

    write_test_data(sampled_out)
    out = tmp_path / "out"
    out.mkdir()
    manifest = read_manifest(sampled_out)
    shutil.copy(sampled_out / "sample_head.onnx", out)
    (out / "test_data").mkdir()
    shutil.copy(sampled_out / "test_data" / "sample_head_input.npz", out / "test_data")
    manifest.segments = [manifest.segment("sample_head")]
    manifest.write(out)
    report = compile_segments(out, venv, CompileOptions(quantize="f16", check="all"))
    assert report.passed and [r.segment for r in report.results if r.checked] == ["sample_head"]
    deploy = next(s for s in report.plan.steps if s.action == "deploy")
    assert "--dynamic" in deploy.argv and "io_alone" in deploy.argv and "--quantize" not in deploy.argv
    backend = BmodelBackend(report.bmodel, manifest, venv)
    try:
        assert backend.nets["sample_head"].inputs[4]["dtype"] == "i32"
        rng = np.random.default_rng(11)
        for penalty, temperature, top_k, top_p in [(1.3, 0.7, 40, 0.8), (1.0, 1.0, 1, 1.0)]:
            logits = (rng.standard_normal((1, manifest.model.vocab_size)) * 3).astype(np.float32)
            ids = rng.integers(0, manifest.model.vocab_size, size=(1, SEQ))
            probs, tokens = backend.run("sample_head", logits, ids, np.array([penalty], np.float32),
                                        np.array([temperature], np.float32), np.array([top_k], np.int32),
                                        np.array([top_p], np.float32))
            want_probs, want_tokens = sample_reference(logits, ids, penalty, temperature, top_k, top_p)
            np.testing.assert_array_equal(np.asarray(tokens).reshape(1, -1), want_tokens)
            np.testing.assert_allclose(np.asarray(probs).reshape(1, -1), want_probs, atol=1e-5, rtol=0)
        # compiled --dynamic: the runtime may hand it fewer recent tokens (forward_dynamic at [1, 6])
        logits = (rng.standard_normal((1, manifest.model.vocab_size)) * 3).astype(np.float32)
        recent = np.argsort(-logits)[:, :6]  # the best tokens seen: the penalty re-ranks them
        probs, tokens = backend.run("sample_head", logits, recent, np.array([1.5], np.float32),
                                    np.array([0.8], np.float32), np.array([30], np.int32),
                                    np.array([0.9], np.float32), dynamic=True)
        want_probs, want_tokens = sample_reference(logits, recent, 1.5, 0.8, 30, 0.9)
        np.testing.assert_array_equal(np.asarray(tokens).reshape(1, -1), want_tokens)
        np.testing.assert_allclose(np.asarray(probs).reshape(1, -1), want_probs, atol=1e-5, rtol=0)
    finally:
        backend.close()
