"""Compile-script generation, the compile runner (with stand-in tools) and the per-segment test data: no toolchain."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from fake_toolchain import fake_venv as _fake_venv

from tpugraph.compiler import (
    CompileOptions,
    SegmentCompileError,
    check_toolchain,
    compile_segments,
    default_tpu_mlir_venv,
    deploy_flags,
    failure_reason,
    parse_min_cosine,
    plan_compile,
    render_script,
    write_compile_script,
)
from tpugraph.compiler.plan import TRANSFORM_DRIVER
from tpugraph.contract.manifest import read_manifest
from tpugraph.contract.segments import MASK_VALUE, decode_inputs, prefill_inputs
from tpugraph.errors import CompileError, UsageError
from tpugraph.export.compare_inputs import (
    TEST_DATA_DIR,
    default_decode_position,
    make_prompt,
    realistic_inputs,
    segment_npz,
    write_test_data,
)
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.runtime.loop import SegmentRuntime

SEQ = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The tiny-llama preset exported once (no test data)."""
    out = tmp_path_factory.mktemp("tiny") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ))
    return out


@pytest.fixture(scope="module")
def with_data(exported, tmp_path_factory) -> Path:
    """The same export plus OUT/test_data."""
    out = tmp_path_factory.mktemp("tiny-data") / "out"
    shutil.copytree(exported, out)
    write_test_data(out)
    return out


def _deploy_argv(plan, segment):
    return next(s.argv for s in plan.steps if s.segment == segment and s.action == "deploy")


def _transform_argv(plan, segment):
    return next(s.argv for s in plan.steps if s.segment == segment and s.action == "transform")


def _value(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


# ------------------------------------------------------------------------------------------- the script


def test_script_is_deterministic_and_relocatable(with_data, tmp_path):
    first = write_compile_script(with_data, CompileOptions("bm1684x", "f16"))
    text = first.read_text()
    assert first.name == "compile_f16_bm1684x_1dev.sh"
    assert write_compile_script(with_data, CompileOptions("bm1684x", "f16")).read_text() == text
    moved = tmp_path / "moved"
    shutil.copytree(with_data, moved)
    assert write_compile_script(moved, CompileOptions("bm1684x", "f16")).read_text() == text
    assert str(with_data) not in text and str(moved) not in text  # every path is relative to the script's folder
    assert first.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(first)], check=True)


def test_script_has_every_segment_and_the_combine(with_data):
    manifest = read_manifest(with_data)
    plan = plan_compile(with_data, CompileOptions("bm1684x", "f16"))
    script = render_script(plan, manifest)
    names = [s.name for s in manifest.segments]
    assert [s.segment for s in plan.steps if s.action == "transform"] == names
    assert [s.segment for s in plan.steps if s.action == "deploy"] == names
    assert plan.steps[-1].action == "combine"
    combine = plan.steps[-1].argv
    assert combine[:2] == ("model_tool", "--combine")
    assert list(combine[2:-2]) == [f"{n}/{n}.bmodel" for n in names]
    assert combine[-2:] == ("-o", "{OUT}/llama_f16_seq16_bm1684x_1dev.bmodel")
    for name in names:
        assert f"--model_def \"$OUT\"/{name}.onnx" in script
        assert f"--model {name}.bmodel" in script
    # model_transform runs inside tpugraph's transform driver (its Top fusions), copied beside the work folders
    assert script.count(f'python3 "$OUT"/{plan.work_dir}/{TRANSFORM_DRIVER} \\') == len(names)
    assert script.count("model_deploy.py \\") == len(names)
    assert "set -euo pipefail" in script


def test_flags_per_segment_kind(with_data):
    plan = plan_compile(with_data, CompileOptions("bm1684x", "f16"))
    manifest = read_manifest(with_data)
    for seg in manifest.segments:
        argv = _deploy_argv(plan, seg.name)
        assert _value(argv, "--chip") == "bm1684x"
        io_alone = _value(argv, "--addr_mode") == "io_alone"
        assert io_alone == (seg.kind == "block_cache"), seg.name
        if seg.kind == "greedy_head":
            assert "--quantize" not in argv  # F32: the tool's default
        else:
            assert _value(argv, "--quantize") == "F16", seg.name
        assert ("--quant_input" in argv) is True, seg.name
        assert ("--quant_output" in argv) == (seg.kind in ("embedding", "embedding_cache", "block", "block_cache"))
        assert "--q_group_size" not in argv and "--num_device" not in argv


def test_weight_only_modes(with_data):
    plan = plan_compile(with_data, CompileOptions("bm1688", "w4bf16"))
    assert _value(_deploy_argv(plan, "block_0"), "--quantize") == "W4BF16"
    assert _value(_deploy_argv(plan, "block_0"), "--q_group_size") == "64"
    assert _value(_deploy_argv(plan, "lm_head"), "--q_group_size") == "64"
    # a lookup table keeps the float type of the mode and has no weight-only quantization
    assert _value(_deploy_argv(plan, "embedding"), "--quantize") == "BF16"
    assert "--q_group_size" not in _deploy_argv(plan, "embedding")
    assert "--quantize" not in _deploy_argv(plan, "greedy_head")
    assert plan.bmodel == "llama_w4bf16_seq16_bm1688_1dev.bmodel"

    w8 = plan_compile(with_data, CompileOptions("bm1684x", "W8F16"))
    assert _value(_deploy_argv(w8, "block_cache_1"), "--quantize") == "W8F16"
    assert "--q_group_size" not in _deploy_argv(w8, "block_cache_1")  # model_deploy's group (64) unless asked
    assert _value(_deploy_argv(w8, "embedding_cache"), "--quantize") == "F16"
    grouped = plan_compile(with_data, CompileOptions("bm1684x", "w8f16", q_group_size=128))
    assert _value(_deploy_argv(grouped, "block_1"), "--q_group_size") == "128"


def test_multi_device(with_data):
    plan = plan_compile(with_data, CompileOptions("bm1684x", "bf16", num_device=2))
    for seg in plan.segments:
        # the F32 heads stay single-device: tpu-mlir's device-parallel pass aborts on them
        assert _value(_deploy_argv(plan, seg), "--num_device") == (None if seg == "greedy_head" else "2")
    assert plan.bmodel == "llama_bf16_seq16_bm1684x_2dev.bmodel"
    assert plan.script_name == "compile_bf16_bm1684x_2dev.sh"


def test_multi_core(with_data):
    plan = plan_compile(with_data, CompileOptions("bm1688", "bf16", num_core=2))
    for seg in plan.segments:
        # as llm_convert deploys: every net on the chip's cores but the F32 heads
        assert _value(_deploy_argv(plan, seg), "--num_core") == (None if seg == "greedy_head" else "2")
    assert plan.bmodel == "llama_bf16_seq16_bm1688_1dev_2core.bmodel"
    assert plan.command.endswith("--num-core 2")
    single = plan_compile(with_data, CompileOptions("bm1688", "bf16"))
    assert not any("--num_core" in s.argv for s in single.steps) and single.bmodel.endswith("_1dev.bmodel")


def test_numerical_checks_only_with_test_data(exported, with_data):
    without = plan_compile(exported, CompileOptions())
    assert not any(s.checked for s in without.steps)
    assert not any("--test_input" in s.argv for s in without.steps)
    plan = plan_compile(with_data, CompileOptions(check="all"))
    assert plan.command.endswith("--check all") and not plan.end_to_end
    for seg in plan.segments:
        t, d = _transform_argv(plan, seg), _deploy_argv(plan, seg)
        assert _value(t, "--test_input") == f"{{OUT}}/{segment_npz(seg)}"
        assert _value(t, "--test_result") == f"{seg}_top_outputs.npz"
        assert _value(d, "--test_input") == f"{{OUT}}/{segment_npz(seg)}"
        assert _value(d, "--test_reference") == f"{seg}_top_outputs.npz"
    unchecked = plan_compile(with_data, CompileOptions(check=False))
    assert not any("--test_input" in s.argv for s in unchecked.steps)
    assert unchecked.command.endswith("--no-check") and not unchecked.end_to_end


def test_default_check_compares_one_segment_per_structure_then_end_to_end(with_data):
    """Weight-swapped layers share their first layer's graph: the tools compare that one only."""
    manifest = read_manifest(with_data)
    assert manifest.segment("block_1").graph_reused_from == "block_0"
    plan = plan_compile(with_data, CompileOptions())
    assert plan.options.check == "representative" and plan.end_to_end
    compared = {s.segment for s in plan.steps if s.checked}
    assert compared == {"embedding", "embedding_cache", "block_0", "block_cache_0", "lm_head", "greedy_head"}
    assert "--test_input" not in _transform_argv(plan, "block_1")
    # each step names the file it produces (no re-parsing of its argv)
    deploy = next(s for s in plan.steps if s.segment == "block_1" and s.action == "deploy")
    assert deploy.produces == "block_1.bmodel"
    assert deploy.output_path(with_data) == with_data / plan.work_dir / "block_1" / "block_1.bmodel"
    assert plan.steps[-1].output_path(with_data) == with_data / plan.bmodel


@pytest.mark.parametrize("options, message", [
    (CompileOptions(chip="bm1686"), "chip must be one of bm1684x, bm1688"),
    (CompileOptions(quantize="int8"), "quantization must be one of f16, bf16, w8bf16"),
    (CompileOptions(quantize="f16", q_group_size=64), "a group size applies to the weight-only modes"),
    (CompileOptions(quantize="w4f16", q_group_size=0), "the group size must be a positive number"),
    (CompileOptions(num_device=3), "the device count must be one of 1, 2, 4, 8"),
    (CompileOptions(chip="bm1688", num_device=2), "a device count > 1 needs bm1684x: bm1688 is a single-chip SoC"),
    (CompileOptions(chip="bm1690", num_device=2), "needs bm1684x: bm1690 has no multi-device compile proven"),
    (CompileOptions(chip="bm1684x", num_core=2), "the core count must be 1 to 1 on bm1684x, which has 1 TPU core "),
    (CompileOptions(chip="bm1688", num_core=4), "the core count must be 1 to 2 on bm1688, which has 2 TPU cores"),
    (CompileOptions(chip="cv186x", num_core=0), r"the core count must be 1 to 1 on cv186x.*\(got 0\)"),
    (CompileOptions(check="some"), "check must be one of representative, all, none"),
])
def test_bad_options(exported, options, message):
    with pytest.raises(UsageError, match=message.replace("+", r"\+")):
        plan_compile(exported, options)


def test_incomplete_or_missing_output(exported, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    manifest = read_manifest(out)
    manifest.complete = False
    manifest.write(out)
    with pytest.raises(UsageError, match="incomplete"):
        plan_compile(out)
    with pytest.raises(Exception, match="no manifest.json"):
        plan_compile(tmp_path)


def test_deploy_flags_table():
    opts = CompileOptions("bm1684x", "w4f16").check_options()
    assert deploy_flags("block_cache", opts) == ["--quantize", "W4F16", "--q_group_size", "64", "--chip", "bm1684x",
                                                 "--quant_input", "--quant_output", "--addr_mode", "io_alone"]
    assert deploy_flags("lm_head", opts) == ["--quantize", "W4F16", "--q_group_size", "64", "--chip", "bm1684x",
                                             "--quant_input"]
    assert deploy_flags("penalty_sample_head", opts) == ["--chip", "bm1684x", "--quant_input"]


# ------------------------------------------------------------------------------------------- the test data


def _graph_inputs(path: Path):
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        out.append((v.name, tuple(d.dim_value for d in tt.shape.dim),
                    onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return out


def test_test_data_keys_shapes_dtypes(with_data):
    manifest = read_manifest(with_data)
    assert sorted(p.name for p in (with_data / TEST_DATA_DIR).iterdir()) == sorted(
        Path(segment_npz(s.name)).name for s in manifest.segments)
    for seg in manifest.segments:
        assert seg.test_data.file == segment_npz(seg.name)
        data = np.load(with_data / segment_npz(seg.name))
        inputs = _graph_inputs(with_data / seg.file)
        assert list(data.files) == [name for name, _, _ in inputs], seg.name
        for name, shape, dtype in inputs:
            assert data[name].shape == shape, (seg.name, name)
            want = np.int32 if np.dtype(dtype).kind in "iu" else dtype
            assert data[name].dtype == want, (seg.name, name)
            assert np.isfinite(data[name]).all()


def test_test_data_is_the_runtime_driving_a_prompt(with_data):
    manifest = read_manifest(with_data)
    info = manifest.segment("block_cache_0").test_data
    n = info.decode_position
    assert n == default_decode_position(SEQ) and info.prefill_tokens == SEQ
    load = lambda name: np.load(with_data / segment_npz(name))  # noqa: E731
    prompt = make_prompt(manifest.model.vocab_size, SEQ, 0, manifest.model.bos_token_id)
    rt = SegmentRuntime(with_data)

    # prefill: a window-filling prompt, the contract's positions and causal mask, each block fed the previous
    ids, pos, mask = prefill_inputs(prompt, SEQ)
    assert load("embedding")["input_ids"].tolist() == [prompt]
    (embed,) = rt.run("embedding", ids)
    b0 = load("block_0")
    np.testing.assert_array_equal(b0["input_states"], embed)
    np.testing.assert_array_equal(b0["position_ids"], pos)
    np.testing.assert_array_equal(b0["attention_mask"], mask)
    hidden0 = rt.run("block_0", b0["input_states"], b0["position_ids"], b0["attention_mask"])[0]
    np.testing.assert_allclose(load("block_1")["input_states"], hidden0, rtol=1e-6, atol=1e-6)
    last, _ = rt.prefill(prompt)
    np.testing.assert_allclose(load("lm_head")["hidden_states"], last.reshape(1, -1), rtol=1e-6, atol=1e-6)
    (logits,) = rt.run("lm_head", last.reshape(1, -1))
    np.testing.assert_allclose(load("greedy_head")["m_logits"], logits, rtol=1e-6, atol=1e-6)

    # decode at index n after prefilling the first n tokens: history = that prefill's KV (garbage rows too)
    short_last, history = rt.prefill(prompt[:n])
    token, _ = rt.next_token(short_last)
    assert load("embedding_cache")["input_ids"].tolist() == [[token]]
    _, dpos, dmask = decode_inputs(token, n, SEQ)
    for layer in range(manifest.model.num_layers):
        bc = load(f"block_cache_{layer}")
        np.testing.assert_array_equal(bc["position_ids"], dpos)
        np.testing.assert_array_equal(bc["attention_mask"], dmask)
        np.testing.assert_allclose(bc["history_k"], history[layer][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bc["history_v"], history[layer][1], rtol=1e-6, atol=1e-6)
    assert (load("block_cache_0")["attention_mask"][0, 0, 0, n:SEQ] == MASK_VALUE).all()
    (embed_one,) = rt.run("embedding_cache", np.array([[token]]))
    np.testing.assert_array_equal(load("block_cache_0")["input_states"], embed_one)


def test_test_data_int64_export_feeds_int32(tmp_path):
    out = tmp_path / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=8, int_dtype="int64", passes=[]))
    write_test_data(out, decode_position=3)
    assert _graph_inputs(out / "block_0.onnx")[1][2] == np.int64
    data = np.load(out / segment_npz("block_cache_1"))
    assert data["position_ids"].dtype == np.int32 and data["position_ids"].tolist() == [[3]]


def test_test_data_refuses_bad_positions(exported):
    manifest = read_manifest(exported)
    for bad in (0, SEQ):
        with pytest.raises(UsageError, match="decode position"):
            realistic_inputs(exported, manifest, decode_position=bad)


# ------------------------------------------------------------------------------------------- running it


def test_compile_runs_the_plan_and_reports(with_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(with_data, out)
    venv = _fake_venv(tmp_path)
    seen = []
    report = compile_segments(out, venv, CompileOptions("bm1684x", "f16", check="all"),
                              progress=seen.append)
    manifest = read_manifest(out)
    assert report.passed and report.bmodel == out.resolve() / "llama_f16_seq16_bm1684x_1dev.bmodel"
    assert report.bmodel.is_file()
    assert [r.segment for r in report.results] == [s.name for s in manifest.segments]
    for r in report.results:
        assert r.transform_ok and r.deploy_ok and r.checked
        assert r.transform_similarity == pytest.approx(0.999) and r.deploy_similarity == pytest.approx(0.998)
        assert r.min_similarity == pytest.approx(0.998)
    assert (seen[0].segment, seen[0].action, seen[0].finished) == ("embedding", "transform", False)
    finished = [e for e in seen if e.finished]
    # every step of the plan ends once, counted 1..total, never past it (no end-to-end check with check=all)
    assert [e.done for e in finished] == list(range(1, len(finished) + 1)) and finished[-1].done == seen[0].total
    assert (finished[-1].segment, finished[-1].action) == ("", "combine") and seen[0].total == 2 * len(manifest.segments) + 1
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 2 * len(manifest.segments) + 1
    assert calls[0].startswith(f"model_transform.py --model_name embedding --model_def {out.resolve()}/embedding.onnx")
    assert (out / "compile_f16_bm1684x_1dev.sh").is_file()
    table = report.table()
    assert table.splitlines()[0].split() == ["segment", "transform", "min", "similarity", "deploy", "seconds"]
    assert "block_cache_1" in table and "0.998000" in table


def test_compile_stops_at_the_rejected_segment(with_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(with_data, out)
    venv = _fake_venv(tmp_path, fail_segment="block_cache_0", fail_tool="model_transform.py")
    with pytest.raises(CompileError) as info:
        compile_segments(out, venv, CompileOptions())
    err = info.value
    assert isinstance(err, SegmentCompileError) and err.exit_code == 8
    assert err.segment == "block_cache_0" and err.action == "transform"
    assert "segment 'block_cache_0'" in str(err) and "Unsupport opset for ReduceMean" in str(err)
    assert err.log_path.is_file()
    results = {r.segment: r for r in err.report.results}
    assert results["block_0"].deploy_ok and results["block_cache_0"].transform_ok is False
    assert "block_1" not in results  # stopped there
    calls = (tmp_path / "calls.log").read_text()
    assert "--model_name block_1" not in calls and "--combine" not in calls
    assert not list(out.glob("*.bmodel"))


def test_progress_counts_the_end_to_end_check_as_the_last_step(with_data, tmp_path, monkeypatch):
    """The default check ends with verify --bmodel: it is a step of the count, never [N+1/N]."""
    from types import SimpleNamespace

    import tpugraph.proof.verify

    monkeypatch.setattr(tpugraph.proof.verify, "verify", lambda *a, **k: SimpleNamespace(passed=True))
    out = tmp_path / "out"
    shutil.copytree(with_data, out)
    seen = []
    compile_segments(out, _fake_venv(tmp_path), CompileOptions(), progress=seen.append, jobs=2)
    finished = [e for e in seen if e.finished]
    total = seen[0].total
    assert total == 2 * len(read_manifest(out).segments) + 2  # every step, the combine and the end-to-end check
    assert sorted(e.done for e in finished) == list(range(1, total + 1)) and all(e.done <= e.total for e in seen)
    assert (finished[-1].action, finished[-1].done) == ("end-to-end check", total)


def test_compile_in_parallel(with_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(with_data, out)
    report = compile_segments(out, _fake_venv(tmp_path), CompileOptions(check="all"), jobs=2)
    assert report.passed and report.bmodel.is_file()
    assert [r.segment for r in report.results] == [s.name for s in read_manifest(out).segments]
    failing = _fake_venv(tmp_path / "failing", fail_segment="block_0", fail_tool="model_deploy.py")
    with pytest.raises(SegmentCompileError) as info:
        compile_segments(out, failing, CompileOptions(), jobs=2)
    assert info.value.segment == "block_0" and info.value.action == "deploy"
    ran = [r.segment for r in info.value.report.results]
    # the vocabulary nets start first (the longest transforms), then the plan's order; nothing starts after a failure
    assert ran[:3] == ["embedding", "embedding_cache", "block_0"] and "lm_head" in ran and "greedy_head" not in ran
    with pytest.raises(UsageError, match="jobs must be >= 0"):  # 0 is "as many as llm_convert runs"
        compile_segments(out, failing, CompileOptions(), jobs=-1)


def test_a_tool_that_exits_0_without_its_output_fails(with_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(with_data, out)
    venv = _fake_venv(tmp_path)
    deploy = venv / "bin" / "model_deploy.py"
    deploy.write_text("#!/usr/bin/env bash\necho compiled nothing\n")
    with pytest.raises(SegmentCompileError, match="exited 0 but wrote no embedding.bmodel"):
        compile_segments(out, venv, CompileOptions())


def test_compile_needs_a_toolchain(exported, tmp_path):
    with pytest.raises(UsageError, match="not a tpu-mlir venv.*setup_tpu_mlir.sh"):
        compile_segments(exported, tmp_path)
    with pytest.raises(UsageError):
        check_toolchain(tmp_path / "nowhere")


def test_parse_tool_output():
    text = textwrap.dedent("""\
        min_similarity = (1.0, 1.0, inf)
        npz compare PASSED.
        min_similarity = (0.9999966025352478, 0.997389553064087, 51.68)
        """)
    assert parse_min_cosine(text) == pytest.approx(0.9999966025352478)
    assert parse_min_cosine("no compare here") is None
    failed = textwrap.dedent("""\
        [Running]: npz_tool.py compare a_tpu_outputs.npz a_top_outputs.npz --tolerance 0.99,0.90 --except - -vv
        [hidden_states_Add               ]  NOT_SIMLIAR [FAILED]
        [past_k_Transpose                ]      SIMILAR [PASSED]
        min_similarity = (0.8693544268608093, 0.4705570835829921, 5.93)
        npz compare FAILED.
        RuntimeError: [!Error]: npz_tool.py compare a_tpu_outputs.npz a_top_outputs.npz --tolerance 0.99,0.90 --except - -vv
        """)
    reason = failure_reason(failed)
    assert reason.startswith("numerical compare FAILED (min similarity cosine 0.869354, euclid 0.470557")
    assert "tolerance (cosine, euclid) 0.99,0.90" in reason and "failed tensors: hidden_states_Add" in reason
    assert "past_k" not in reason
    assert failure_reason("x\nRuntimeError: Unsupport opset for ReduceMean\n[Success]: done\n") == \
        "RuntimeError: Unsupport opset for ReduceMean"
    assert failure_reason("") == "no output"
    crashed = ("[Running]: tpuc-opt x.mlir --dev-parallel\nNot supported quantization mode\n"
               "UNREACHABLE executed at DevParallel.cpp:410!\nPLEASE submit a bug report to https://x\nStack dump:\n"
               " #0 0x0\nAborted\nRuntimeError: [!Error]: tpuc-opt x.mlir --dev-parallel\n")
    assert failure_reason(crashed) == ("compiler crashed: Not supported quantization mode / "
                                       "UNREACHABLE executed at DevParallel.cpp:410!")


def test_setup_script_refuses_other_pythons(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "setup_tpu_mlir.sh"
    if sys.version_info[:2] == (3, 10):
        pytest.skip("this interpreter is 3.10: no other Python at hand to refuse")
    proc = subprocess.run(["bash", str(script), sys.executable, str(tmp_path / "venv")], capture_output=True, text=True)
    assert proc.returncode != 0 and "needs Python 3.10 exactly" in proc.stderr
    assert not (tmp_path / "venv").exists()
    proc = subprocess.run(["bash", str(script), str(tmp_path / "no-python"), str(tmp_path / "venv")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "is not an executable Python interpreter" in proc.stderr
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "PYTHON3.10" in proc.stderr


def test_default_toolchain_location(monkeypatch, tmp_path):
    monkeypatch.setenv("TPUGRAPH_TPU_MLIR_VENV", str(tmp_path / "mine"))
    assert default_tpu_mlir_venv() == tmp_path / "mine"
    monkeypatch.delenv("TPUGRAPH_TPU_MLIR_VENV")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_tpu_mlir_venv() == tmp_path / "cache" / "tpugraph" / "tpu-mlir-venv"
    with pytest.raises(UsageError, match="tpu-mlir-venv"):
        check_toolchain()


def test_script_runs_on_the_out_it_is_given(with_data, tmp_path):
    """The script, written anywhere, compiles the OUT of its argument (stand-in tools on PATH)."""
    out = tmp_path / "out"
    shutil.copytree(with_data, out)
    venv = _fake_venv(tmp_path)
    script = write_compile_script(out, CompileOptions("bm1688", "bf16"), tmp_path / "elsewhere.sh")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(script), str(out)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "llama_bf16_seq16_bm1688_1dev.bmodel").is_file()
    assert (out / "compile" / "bf16_bm1688_1dev" / "block_cache_1" / "block_cache_1.bmodel").is_file()
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 2 * len(read_manifest(out).segments) + 1
    # without tpu-mlir on PATH the script says what to do
    bare = subprocess.run(["bash", str(script), str(out)], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True)
    assert bare.returncode == 1 and "activate the tpu-mlir venv" in bare.stderr


# ------------------------------------------------------------------------------------------- the CLI


def _cli():
    from typer.testing import CliRunner

    from tpugraph.cli import app

    names = {c.name for c in app.registered_commands}
    if not {"compile", "compile-script"} <= names:
        pytest.skip("the compile and compile-script commands are not in tpugraph.cli yet")
    return CliRunner(), app


def test_cli_compile_script(with_data, tmp_path):
    runner, app = _cli()
    out = tmp_path / "out"
    shutil.copytree(with_data, out)
    result = runner.invoke(app, ["compile-script", str(out), "--chip", "bm1688", "--quantize", "w4bf16"])
    assert result.exit_code == 0, result.output
    assert (out / "compile_w4bf16_bm1688_1dev.sh").is_file() and "wrote" in result.output
    bad = runner.invoke(app, ["compile-script", str(out), "--quantize", "int8"])
    assert bad.exit_code == 2 and "error: --quantize: quantization must be one of" in bad.output
    bad = runner.invoke(app, ["compile-script", str(out), "--quantize", "f16", "--q-group-size", "64"])
    assert bad.exit_code == 2 and "error: --q-group-size: a group size applies to the weight-only modes" in bad.output
    bad = runner.invoke(app, ["compile-script", str(out), "--check", "some"])
    assert bad.exit_code == 2 and "error: --check: check must be one of representative, all, none" in bad.output
    unchecked = runner.invoke(app, ["compile-script", str(out), "--no-check", "-o", str(tmp_path / "s.sh")])
    assert unchecked.exit_code == 0 and "--test_input" not in (tmp_path / "s.sh").read_text()


def test_cli_compile(with_data, tmp_path):
    runner, app = _cli()
    out = tmp_path / "out"
    shutil.copytree(with_data, out)
    venv = _fake_venv(tmp_path)
    result = runner.invoke(app, ["compile", str(out), "--tpu-mlir", str(venv), "--check", "all"])
    assert result.exit_code == 0, result.output
    assert "block_cache_0" in result.output and "0.998000" in result.output
    # off a terminal: one line per finished step with its time, counted 1..total
    total = 2 * len(read_manifest(out).segments) + 1
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in lines] == [f"[{i}/{total}" for i in range(1, total + 1)], result.stderr
    assert any(re.fullmatch(r"\[\d+/\d+\] embedding: transform \(\d+\.\ds\)", ln) for ln in lines), lines
    assert lines[-1].startswith(f"[{total}/{total}] combine (")
    # the default check ends with verify --bmodel, which needs the venv's Python: the stand-in venv has none
    result = runner.invoke(app, ["compile", str(out), "--tpu-mlir", str(venv)])
    assert result.exit_code == 2 and "has no bin/python" in result.output and "Traceback" not in result.output
    assert (out / "llama_f16_seq16_bm1684x_1dev.bmodel").is_file()
    failing = _fake_venv(tmp_path / "failing", fail_segment="lm_head", fail_tool="model_deploy.py")
    result = runner.invoke(app, ["compile", str(out), "--tpu-mlir", str(failing)])
    assert result.exit_code == 8
    assert "segment 'lm_head'" in result.output and "Unsupport opset for ReduceMean" in result.output
    result = runner.invoke(app, ["compile", str(out), "--tpu-mlir", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "setup_tpu_mlir.sh" in result.output


def test_cli_export_with_test_data(tmp_path):
    runner, app = _cli()
    out = tmp_path / "out"
    result = runner.invoke(app, ["export-and-optimize", "tiny-llama", "-o", str(out), "--seq-length", "8",
                                 "--with-test-data"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    for seg in manifest.segments:
        assert (out / segment_npz(seg.name)).is_file()
        assert seg.test_data.file == segment_npz(seg.name)
    plan = plan_compile(out, CompileOptions(check="all"))
    assert all(s.checked for s in plan.steps if s.action != "combine")
