"""Tensor parallel over N devices (docs/explanation/tensor-parallel.md): the shard proof on tiny-llama (4 heads, 2 KV
heads, GQA) for N = 2 (each device its own KV head) and N = 4 (each KV head copied to two devices), a wrong pairing
of query and KV heads that the proof catches, and the one-line refusals of a split that does not exist."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.compiler import CompileOptions, plan_compile, render_script
from tpugraph.compiler.tensor_parallel import DeviceShard, TensorSplit
from tpugraph.contract.manifest import read_manifest
from tpugraph.errors import EXIT_USAGE, UsageError
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof import tensor_parallel
from tpugraph.proof.tensor_parallel import verify_shards

SEQ = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ))
    return out


@pytest.mark.parametrize("num_device", [2, 4])
def test_shards_reduced_equal_the_whole_block(exported, num_device):
    report = verify_shards(exported, num_device, layers=[0])
    assert report.passed, [c for c in report.checks if not c.ok]
    segments = {c.segment for c in report.checks}
    assert segments == {"block_0", "block_cache_0"}  # prefill and decode
    shards = report.split.shards
    assert [len(s.q_heads) for s in shards] == [4 // num_device] * num_device
    assert sum(len(s.columns) for s in shards) == 160  # the whole intermediate dimension, once
    if num_device == 4:  # 2 KV heads over 4 devices: devices 0,1 hold KV head 0 and 2,3 KV head 1 (their queries')
        assert [s.kv_heads.start for s in shards] == [0, 0, 1, 1]
        assert any("copy of" in c.output for c in report.checks)
    for c in report.checks:
        assert c.cosine > 0.99999 and c.rel_diff < 1e-4, c


def test_a_wrong_pairing_of_query_and_kv_heads_fails(exported, monkeypatch):
    """Device d reading KV head d mod 2 (query heads 1 and 2 then attend with the other group's keys): the
    hidden states must come out wrong, so the proof can fail."""
    def crossed(num_heads, num_kv_heads, num_device, intermediate=None):
        shards = tuple(DeviceShard(d, range(d, d + 1), range(d % 2, d % 2 + 1),
                                   range(d * 40, (d + 1) * 40) if intermediate else range(0)) for d in range(4))
        return TensorSplit(4, num_heads, num_kv_heads, shards)

    monkeypatch.setattr(tensor_parallel, "tensor_split", crossed)
    report = verify_shards(exported, 4, layers=[0])
    assert not report.passed
    hidden = [c for c in report.checks if c.output == "hidden_states"]
    assert hidden and not any(c.ok for c in hidden)


def test_a_split_that_does_not_exist_is_one_line(exported):
    with pytest.raises(UsageError, match="4 attention heads do not split evenly over 8 devices; --num-device 2 or 4"):
        verify_shards(exported, 8)
    with pytest.raises(UsageError, match="over 8 devices"):
        plan_compile(exported, CompileOptions("bm1684x", "bf16", num_device=8))
    result = CliRunner().invoke(app, ["verify", str(exported), "--num-device", "8"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--num-device" in errors[0], result.output
    result = CliRunner().invoke(app, ["verify", str(exported), "--num-device", "2", "--bmodel", "x.bmodel"])
    assert result.exit_code == EXIT_USAGE and "x.bmodel' does not exist" in result.output, result.output


def test_verify_num_device_through_the_cli(exported):
    result = CliRunner().invoke(app, ["verify", str(exported), "--num-device", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("PASS")
    assert "device 1: query heads 2..3, KV heads 1..1, MLP columns 80..159" in result.output
    assert result.output.count(" ok") == 12  # 2 layers x (block, block_cache) x (hidden, past_k, past_v)


def test_the_compile_plan_says_what_the_devices_hold(exported):
    plan = plan_compile(exported, CompileOptions("bm1684x", "bf16", num_device=2))
    assert "does not recognise tpugraph's block graphs" in plan.tensor_parallel_note
    script = render_script(plan, read_manifest(exported))
    assert "# 2 devices: tpu-mlir 1.30.2's --dev-parallel pass" in script
    assert plan_compile(exported, CompileOptions("bm1684x", "bf16")).tensor_parallel_note == ""


# --- export-and-optimize --num-device N: the blocks in the form tpu-mlir's device-parallel pass splits ------------

@pytest.fixture(scope="module")
def exported_split(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp_form") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ, num_device=2))
    return out


def _run_block(path: Path, feeds: dict) -> list:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


def test_the_split_form_computes_what_the_one_device_block_computes(exported, exported_split):
    """Same inputs (a causal mask at the contract's MASK_VALUE, random states and history) through block_0 and
    block_cache_0 of both exports: hidden state and KV outputs equal in float32."""
    import numpy as np

    from tpugraph.contract.segments import MASK_VALUE

    rng = np.random.default_rng(0)
    for name in ("block_0", "block_cache_0"):
        entry = next(s for s in read_manifest(exported).segments if s.name == name)
        feeds = {}
        for t in entry.inputs:
            if t.name == "position_ids":
                feeds[t.name] = (np.arange(t.shape[-1]) if name == "block_0" else np.full(t.shape[-1], 9))[None] \
                    .astype(np.int32)
            elif t.name == "attention_mask":
                q, k = t.shape[-2:]
                mask = np.triu(np.full((q, k), MASK_VALUE, np.float32), 1) if q == k else np.zeros((q, k), np.float32)
                if q != k:
                    mask[:, 9:SEQ] = MASK_VALUE  # history rows 9.. not written yet
                feeds[t.name] = mask.reshape(t.shape)
            else:
                feeds[t.name] = rng.standard_normal(t.shape).astype(np.float32)
        whole = _run_block(exported / entry.file, feeds)
        split = _run_block(exported_split / entry.file, feeds)
        for a, b, out in zip(whole, split, [t.name for t in entry.outputs]):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5, err_msg=f"{name}:{out}")


def test_the_split_form_is_what_the_matcher_takes(exported_split):
    """The mask goes straight from the input into the scores' Add (no Clip), the rotary is plain Mul/Add on the
    projection's [1, S, H, D] view (one Gather per table, shared by Q and K), and the manifest says so."""
    import onnx

    manifest = read_manifest(exported_split)
    assert manifest.options.num_device == 2
    # tiny-llama's down projection (160 x 64) is under tpu-mlir's 4M-element limit: the manifest warns
    assert any("splits the attention only" in n for n in manifest.notes)
    graph = onnx.load(str(exported_split / "block_cache_0.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "Clip" not in ops
    assert [n.op_type for n in graph.node if "attention_mask" in n.input] == ["Add"]
    assert ops.count("Gather") == 2  # cos and sin, once each
    producers = {o: n for n in graph.node for o in n.output}
    rotary_adds = [n for n in graph.node if n.op_type == "Add" and all(
        producers.get(i) is not None and producers[i].op_type == "Mul" for i in n.input)]
    assert len(rotary_adds) == 2  # q and k
    for add in rotary_adds:
        plain = producers[add.input[0]]
        assert producers[plain.input[0]].op_type == "Reshape"  # x * cos on the view, before any Transpose


def test_the_split_form_passes_verify_and_the_shard_proof(exported_split):
    from tpugraph.proof.verify import verify

    report = verify(exported_split, prompt_length=4, new_tokens=4)
    assert report.passed, report
    shards = verify_shards(exported_split, 2, layers=[0])
    assert shards.passed, [c for c in shards.checks if not c.ok]


def test_the_split_form_refuses_what_it_does_not_cover(tmp_path):
    with pytest.raises(UsageError, match="q and k"):  # Qwen3's q/k norms sit between projection and rotary
        export_and_optimize("tiny-qwen3", tmp_path / "q3", ExportOptions(seq_length=SEQ, num_device=2))
    with pytest.raises(UsageError, match="history"):
        ExportOptions(seq_length=SEQ, num_device=2, history_kv=True).check()
    with pytest.raises(UsageError, match="over 8 devices"):
        export_and_optimize("tiny-llama", tmp_path / "l8", ExportOptions(seq_length=SEQ, num_device=8))
    # 2 KV heads over 4 devices: tpu-mlir 1.30.2 aborts ("size is 0"), so the split form refuses it, naming N = 2
    with pytest.raises(UsageError, match=r"2 KV heads are fewer than the devices.*--num-device 2 would"):
        export_and_optimize("tiny-llama", tmp_path / "l4", ExportOptions(seq_length=SEQ, num_device=4))


def test_the_compile_of_the_split_form_refuses_fewer_kv_heads_than_devices(exported, exported_split):
    with pytest.raises(UsageError, match="fewer than the devices"):
        plan_compile(exported_split, CompileOptions("bm1684x", "bf16", num_device=4))
    plan_compile(exported, CompileOptions("bm1684x", "bf16", num_device=4))  # one-device export: copies, no split


def test_the_compile_plan_of_the_split_form_says_the_report_measures_it(exported_split):
    plan = plan_compile(exported_split, CompileOptions("bm1684x", "bf16", num_device=2))
    assert "the compile report measures the split" in plan.tensor_parallel_note
