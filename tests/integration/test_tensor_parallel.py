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
    assert result.exit_code == EXIT_USAGE and "simulates one device" in result.output, result.output


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
