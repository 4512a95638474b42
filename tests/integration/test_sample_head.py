"""The current LLM-TPU runtime's sample_head (issue #12, item 3): against a numpy reference of transformers'
order (repetition penalty -> temperature -> top-k -> top-p), in onnxruntime and compiled by the real tpu-mlir
on the cmodel; `run --sample` reproducible with a seed; `--sample-head legacy` keeps penalty_sample_head."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from sample_reference import K, sample_reference
from typer.testing import CliRunner

from tpugraph.cli import _global_flags_first, app
from tpugraph.contract.manifest import read_manifest
from tpugraph.contract.segments import ContractDims, SegmentKind, segment_specs
from tpugraph.export.exporter import export_segment
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.runtime.sampling import SamplingParams
from tpugraph.runtime.text import run_prompt

SEQ = 16
VOCAB = 300
runner = CliRunner()


@pytest.fixture(scope="module")
def session():
    dims = ContractDims(seq=SEQ, hidden=48, kv_heads=2, head_dim=12, vocab=VOCAB, layers=1)
    spec = next(s for s in segment_specs(dims, sample_head="current") if s.kind == SegmentKind.SAMPLE_HEAD)
    assert [t.name for t in spec.inputs] == ["m_logits", "input_ids", "penalty", "temperature", "top_k", "top_p"]
    assert [(t.name, t.shape, t.dtype) for t in spec.outputs] == [("probs", (1, K), "float32"),
                                                                  ("token_idx", (1, K), "int32")]
    model = export_segment(None, spec, SEQ, "int32").model
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_head(session, logits, ids, penalty, temperature, top_k, top_p):
    return session.run(None, {
        "m_logits": logits.astype(np.float32), "input_ids": ids.astype(np.int32),
        "penalty": np.array([penalty], np.float32), "temperature": np.array([temperature], np.float32),
        "top_k": np.array([top_k], np.int32), "top_p": np.array([top_p], np.float32)})


CASES = [  # seed, penalty, temperature, top_k, top_p
    (0, 1.3, 0.7, 40, 0.8),
    (1, 1.0, 1.0, 50, 1.0),  # penalty 1: nothing changes
    (2, 1.1, 0.5, 1, 0.9),  # top_k 1: the best token alone
    (3, 2.0, 1.5, 10, 0.95),
    (4, 1.0, 0.8, 50, 0.3),
    (5, 1.2, 1.0, 80, 1.0),  # top_k beyond K keeps K
]


@pytest.mark.parametrize("seed,penalty,temperature,top_k,top_p", CASES)
def test_sample_head_matches_the_numpy_reference(session, seed, penalty, temperature, top_k, top_p):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((1, VOCAB)) * 3).astype(np.float32)
    ids = rng.integers(0, VOCAB, size=(1, SEQ))
    ids[0, :4] = np.argsort(-logits[0])[:4]  # the best tokens were seen: the penalty re-ranks them
    probs, tokens = run_head(session, logits, ids, penalty, temperature, top_k, top_p)
    want_probs, want_tokens = sample_reference(logits, ids, penalty, temperature, top_k, top_p)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_allclose(probs, want_probs, atol=1e-5, rtol=0)
    assert abs(float(probs.sum()) - 1) < 1e-5
    if top_k == 1:
        assert probs[0, 0] == pytest.approx(1.0) and not probs[0, 1:].any()


def test_penalty_one_is_the_plain_top_k(session):
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((1, VOCAB)).astype(np.float32)
    ids = np.argsort(-logits)[:, :SEQ]  # every top token seen, penalty 1: nothing moves
    _, tokens = run_head(session, logits, ids, 1.0, 1.0, 50, 1.0)
    np.testing.assert_array_equal(tokens[0], np.argsort(-logits[0], kind="stable")[:K])
    _, moved = run_head(session, logits, ids, 3.0, 1.0, 50, 1.0)
    assert moved[0, 0] != tokens[0, 0]


@pytest.fixture(scope="module")
def sampled_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample-head") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ, sample_head="current"))
    return out


def test_export_records_the_sample_head(sampled_out, tmp_path):
    manifest = read_manifest(sampled_out)
    assert manifest.options.sample_head == "current"
    names = [s.name for s in manifest.segments]
    assert "sample_head" in names and "penalty_sample_head" not in names
    legacy = tmp_path / "legacy"
    r = runner.invoke(app, _global_flags_first(["export-and-optimize", "tiny-llama", "-o", str(legacy),
                                                "--seq-length", "8", "--sample-head", "legacy"]))
    assert r.exit_code == 0, r.output
    names = [s.name for s in read_manifest(legacy).segments]
    assert "penalty_sample_head" in names and "sample_head" not in names
    assert read_manifest(legacy).options.sample_head == "legacy"
    r = runner.invoke(app, _global_flags_first(["export-and-optimize", "tiny-llama", "-o", str(tmp_path / "x"),
                                                "--sample-head", "--lm-head-topk"]))
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error: --lm-head-topk ")


def test_sampled_run_is_reproducible_with_a_seed(sampled_out):
    prompt = [1, 45, 97, 200]
    params = dict(temperature=1.5, top_p=0.95, top_k=30, penalty=1.2)
    first = run_prompt(sampled_out, prompt_ids=prompt, max_new_tokens=8, sampling=SamplingParams(**params, seed=3))
    again = run_prompt(sampled_out, prompt_ids=prompt, max_new_tokens=8, sampling=SamplingParams(**params, seed=3))
    other = [run_prompt(sampled_out, prompt_ids=prompt, max_new_tokens=8,
                        sampling=SamplingParams(**params, seed=s)).tokens for s in (4, 5)]
    assert first.tokens == again.tokens and len(first.tokens) == 8
    assert any(o != first.tokens for o in other)  # the draws do depend on the seed
    assert first.sampling["head"] == "sample_head" and first.sampling["seed"] == 3
    greedy = run_prompt(sampled_out, prompt_ids=prompt, max_new_tokens=4)
    top1 = run_prompt(sampled_out, prompt_ids=prompt, max_new_tokens=4, sampling=SamplingParams(top_k=1, seed=9))
    assert top1.tokens == greedy.tokens  # top-k 1 is greedy whatever the seed
    r = runner.invoke(app, ["-q", "run", str(sampled_out), "--prompt-ids", "1,45,97,200", "--max-new-tokens", "8",
                            "--sample", "--temperature", "1.5", "--top-p", "0.95", "--top-k", "30", "--penalty",
                            "1.2", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert r.output.split("\n")[0].split() == [str(t) for t in first.tokens]


def test_sample_on_an_output_without_a_sample_head_is_one_line(tmp_path, sampled_out):
    out = tmp_path / "plain"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=8))
    r = runner.invoke(app, ["run", str(out), "--prompt-ids", "1,2", "--sample"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [
        f"error: '{out}' has no sample head: re-export with --sample-head (or --sample-head legacy) to sample, "
        "or drop --sample for greedy decoding"]
    r = runner.invoke(app, ["run", str(sampled_out), "--prompt-ids", "1,2", "--sample", "--top-k", "0"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error: --top-k must be within 1..50")
