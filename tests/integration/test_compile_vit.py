"""Compiling a vision-language output (the tiny Qwen2.5-VL of tests/vlm_models.py): the plan's vit net (float mode,
--quant_output, --high_precision, test data for the tools' compares), the combined bmodel with the stand-in tools of
tests/fake_toolchain.py, and the one line for a bmodel without a vit net. No toolchain."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from fake_toolchain import fake_venv
from vlm_models import MAX_PIXELS, build_qwen2_5_vl

from tpugraph.compiler import CompileOptions, compile_segments, deploy_flags, plan_compile
from tpugraph.contract.manifest import read_manifest
from tpugraph.errors import VerificationError
from tpugraph.export.compare_inputs import segment_npz
from tpugraph.export.pipeline import ExportOptions, export_and_optimize

SEQ = 32


@pytest.fixture(scope="module")
def vlm_out(tmp_path_factory):
    """The tiny Qwen2.5-VL exported with its test data."""
    folder = build_qwen2_5_vl(tmp_path_factory.mktemp("vlm-model"))
    out = tmp_path_factory.mktemp("vlm-out") / "out"
    export_and_optimize(str(folder), out, ExportOptions(seq_length=SEQ, max_pixels=MAX_PIXELS, with_test_data=True))
    return out


def _deploy(plan, segment):
    return next(s.argv for s in plan.steps if s.segment == segment and s.action == "deploy")


@pytest.mark.parametrize("mode, vit_mode", [("f16", "F16"), ("bf16", "BF16"), ("w4bf16", "BF16"), ("w8f16", "F16")])
def test_the_vit_stays_in_the_float_mode(vlm_out, mode, vit_mode):
    plan = plan_compile(vlm_out, CompileOptions("bm1684x", mode))
    vit = _deploy(plan, "vit")
    assert vit[vit.index("--quantize") + 1] == vit_mode and "--q_group_size" not in vit
    # its rows go on into the embedding stream in the blocks' float type; the host gives it float32 pixels
    assert "--quant_output" in vit and "--quant_input" not in vit and "--high_precision" in vit
    block = _deploy(plan, "block_0")
    assert block[block.index("--quantize") + 1] == mode.upper() and "--high_precision" not in block
    combine = plan.steps[-1].argv
    assert "vit/vit.bmodel" in combine and combine.index("vit/vit.bmodel") < combine.index("block_0/block_0.bmodel")


def test_deploy_flags_of_the_vit():
    assert deploy_flags("vit", CompileOptions("bm1688", "w4f16").check_options()) == [
        "--quantize", "F16", "--chip", "bm1688", "--quant_output", "--high_precision"]


def test_test_data_covers_the_vit(vlm_out):
    manifest = read_manifest(vlm_out)
    vit = manifest.segment("vit")
    data = np.load(vlm_out / segment_npz("vit"))
    assert list(data.files) == [t.name for t in vit.inputs]
    for spec in vit.inputs:
        assert list(data[spec.name].shape) == list(spec.shape)
        assert data[spec.name].dtype == (np.int32 if np.dtype(spec.dtype).kind in "iu" else np.float32)
    pixels = data[vit.inputs[0].name]
    rows = int((np.abs(pixels).sum(axis=1) > 0).sum())  # the synthetic picture: 48 patches of the vit's 64
    assert 0 < rows < pixels.shape[0] and not pixels[rows:].any()
    plan = plan_compile(vlm_out, CompileOptions())  # representative: the vit is its own structure, compared
    checked = {s.segment for s in plan.steps if s.checked}
    assert "vit" in checked and plan.end_to_end
    transform = next(s.argv for s in plan.steps if s.segment == "vit" and s.action == "transform")
    assert transform[transform.index("--test_input") + 1] == f"{{OUT}}/{segment_npz('vit')}"


def test_compile_combines_the_vit_with_the_other_nets(vlm_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(vlm_out, out)
    report = compile_segments(out, fake_venv(tmp_path), CompileOptions("bm1684x", "bf16", check="all"))
    assert report.passed and report.bmodel.name.endswith("_bf16_seq32_bm1684x_1dev.bmodel") and report.bmodel.is_file()
    results = {r.segment: r for r in report.results}
    assert results["vit"].deploy_ok and results["vit"].checked
    calls = (tmp_path / "calls.log").read_text().splitlines()
    vit_deploy = next(c for c in calls if c.startswith("model_deploy.py --mlir vit.mlir"))
    assert "--quantize BF16" in vit_deploy and "--high_precision" in vit_deploy
    assert "vit/vit.bmodel" in calls[-1] and calls[-1].startswith("model_tool --combine")


def test_a_bmodel_without_a_vit_net_is_one_line(vlm_out):
    from tpugraph.runtime.backends.bmodel_backend import NetInfo, check_against_manifest

    manifest = read_manifest(vlm_out)
    nets = {s.name: NetInfo([{"shape": list(t.shape)} for t in s.inputs], [{"shape": list(t.shape)} for t in s.outputs])
            for s in manifest.segments}
    check_against_manifest(nets, manifest, vlm_out / "a.bmodel")  # every net: accepted
    del nets["vit"]
    with pytest.raises(VerificationError) as info:
        check_against_manifest(nets, manifest, vlm_out / "a.bmodel")
    message = str(info.value)
    assert "a.bmodel has no vit net" in message and "tpugraph compile" in message and "\n" not in message
