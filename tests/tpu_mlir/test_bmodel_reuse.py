"""bmodel_reuse: layers of one structure take their F16/BF16 bmodel from another layer's deploy (their weights
written into a copy, proven byte for byte on a layer deployed for real); the combined bmodel still talks like
transformers."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess

import numpy as np
import pytest
import torch

from tpugraph.compiler.bmodel_reuse import DRIVER, plan_deploy_reuse
from tpugraph.compiler.plan import Step
from tpugraph.tpu_mlir.guest import tpu_mlir_bmodel_reuse as driver

# ------------------------------------------------------------------------------------------ planning (no tools)


def _steps(layers: int, checked: tuple[str, ...] = ()) -> list[Step]:
    steps = []
    for kind in ("block", "block_cache"):
        for i in range(layers):
            name = f"{kind}_{i}"
            reuse = f"{kind}_0" if i else ""
            steps.append(Step(name, "transform", ("x",), name, f"{name}.mlir", checked=name in checked, reuse_from=reuse))
            steps.append(Step(name, "deploy", ("x",), name, f"{name}.bmodel", checked=name in checked))
    return steps


def test_thirty_layers_deploy_two_per_name_room_and_derive_the_rest():
    plans = {p.template: p for p in plan_deploy_reuse(_steps(30), "bf16", "representative")}
    # "block_7" and "block_12" lay the bmodel's description out differently: one proof per name room
    assert set(plans) == {"block_0", "block_10", "block_cache_0"}
    assert plans["block_0"].prover == "block_1" and plans["block_0"].targets == tuple(f"block_{i}" for i in range(2, 10))
    assert plans["block_10"].prover == "block_11"
    assert plans["block_10"].targets == tuple(f"block_{i}" for i in range(12, 30))
    assert plans["block_cache_0"].targets == tuple(f"block_cache_{i}" for i in range(2, 30))  # one room: 16 bytes


def test_short_models_quantized_modes_and_full_checks_deploy_everything():
    assert plan_deploy_reuse(_steps(2), "bf16", "none") == []
    assert plan_deploy_reuse(_steps(30), "w4bf16", "none") == []  # a quantization is no rounding
    assert plan_deploy_reuse(_steps(30), "f16", "all") == []  # every deploy is a compare
    few = plan_deploy_reuse(_steps(5), "f16", "none")
    assert [(p.template, p.prover, p.targets) for p in few] == [
        ("block_0", "block_1", ("block_2", "block_3", "block_4")),
        ("block_cache_0", "block_cache_1", ("block_cache_2", "block_cache_3", "block_cache_4"))]
    checked = plan_deploy_reuse(_steps(5, checked=("block_3",)), "f16", "representative")
    assert "block_3" not in checked[0].targets


def test_lowering_rounds_to_nearest_even_like_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 10000),
                        np.array([0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 65504.0, 1e-40], np.float32)])
    bf16 = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(driver.lower(x, "bf16"), bf16)
    assert np.array_equal(driver.lower(x, "f16"), x.astype(np.float16).view(np.uint16))


def _flatbuffer_string(name: str, room_after: bytes = b"NEXT") -> bytearray:
    room = (len(name) + 1 + 3) // 4 * 4
    return bytearray(b"head" + struct.pack("<I", len(name)) + name.encode().ljust(room, b"\0") + room_after)


def test_a_net_name_is_rewritten_in_its_room_or_refused():
    data = _flatbuffer_string("block_10")
    driver._rename(data, 0, len(data), "block_10", "block_7")
    assert data == bytearray(b"head" + struct.pack("<I", 7) + b"block_7\0\0\0\0\0" + b"NEXT")
    data = _flatbuffer_string("block_7")
    with pytest.raises(driver.NotDerivable, match="does not fit"):
        driver._rename(data, 0, len(data), "block_7", "block_10")
    with pytest.raises(driver.NotDerivable, match="not found once"):
        driver._rename(data, 0, len(data), "block_1", "block_2")


def test_the_check_code_must_occur_exactly_once():
    code = hashlib.sha256(b"a").digest()
    data = bytearray(b"x" + code + b"y")
    driver._replace_once(data, 0, len(data), code, hashlib.sha256(b"b").digest())
    assert data[1:33] == hashlib.sha256(b"b").digest()
    twice = bytearray(code + code)
    with pytest.raises(driver.NotDerivable):
        driver._replace_once(twice, 0, len(twice), code, code)


# --------------------------------------------------------------------------------- the real compiler and cmodel

LAYERS = 5
SEQ = 16


@pytest.fixture(scope="module")
def compiled(toolchain, tmp_path_factory):
    from conftest import build_model_dir

    from tpugraph.compiler import CompileOptions, compile_segments
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize

    root = tmp_path_factory.mktemp("bmodel-reuse")
    # build_model_dir perturbs the norms: norms of ones would be one array to weight swapping, which would then
    # not reuse the layers' graph (and so nothing would be derived)
    model = build_model_dir(root / "model", "llama", vocab_size=256, hidden_size=64, intermediate_size=160,
                            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, tie_word_embeddings=True)
    out = root / "out"
    export_and_optimize(str(model), out, ExportOptions(seq_length=SEQ))
    report = compile_segments(out, toolchain, CompileOptions(quantize="bf16", check="none"), jobs=2)
    return toolchain, out, report


@pytest.mark.slow
def test_layers_take_their_bmodel_from_a_proven_deploy_and_the_model_still_talks(compiled):
    from tpugraph.proof.verify import verify

    venv, out, report = compiled
    # the last layer ends with the final norm (the tied vocabulary matrix is shared, vocab_sharing.py): a structure
    # of its own, deployed for real
    assert set(report.plan.vocab_sharing.last_layer) == {f"block_{LAYERS - 1}", f"block_cache_{LAYERS - 1}"}
    expected = sorted(f"{k}_{i}" for k in ("block", "block_cache") for i in range(2, LAYERS - 1))
    assert sorted(report.deploys_derived) == expected, report.deploy_reuse_notes
    work = out / report.plan.work_dir
    template = (work / "block_0" / "block_0.bmodel").read_bytes()
    for name in expected:
        derived = (work / name / f"{name}.bmodel").read_bytes()
        assert len(derived) == len(template) and derived != template  # same net, other weights
        assert name.encode() in derived
    by_name = {r.segment: r for r in report.results}
    assert by_name["block_3"].deploy_derived == "block_0" and by_name["block_1"].deploy_derived == ""
    assert by_name[f"block_{LAYERS - 1}"].deploy_ok and by_name[f"block_{LAYERS - 1}"].deploy_derived == ""
    result = verify(out, prompt=[1, 45, 97, 200], new_tokens=3, bmodel=report.bmodel, tpu_mlir=venv)
    assert result.tokens_equal and result.passed, result.to_json()


@pytest.mark.slow
def test_a_derivation_that_does_not_reproduce_the_real_deploy_is_refused(compiled, tmp_path):
    """The prover's weights swapped for another layer's: its derived bmodel differs from model_deploy's."""
    venv, out, report = compiled
    work = out / report.plan.work_dir
    spec = {"template": {"name": "block_0", "dir": str(work / "block_0"), "mode": "bf16"},
            "prove": {"name": "block_1", "dir": str(work / "block_1"),
                      "weights": str(work / "block_2" / "block_2_top_f32_all_weight.npz")},
            "targets": [{"name": "block_3", "dir": str(tmp_path / "block_3"),
                         "weights": str(work / "block_3" / "block_3_top_f32_all_weight.npz")}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    script = driver.__file__.replace("tpu_mlir_bmodel_reuse.py", DRIVER)
    run = subprocess.run([str(venv / "bin" / "python3"), script, str(tmp_path / "spec.json")],
                         capture_output=True, text=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"proven": False, "reason": "block_1 derived differs from model_deploy's", "derived": []}
    assert not (tmp_path / "block_3").exists()


def _differ_in_one_short_span(a: bytes, b: bytes) -> bool:
    """Equal but for one span of at most 32 bytes (the build time model_deploy writes into every bmodel)."""
    if len(a) != len(b):
        return False
    diff = [i for i in range(len(a)) if a[i] != b[i]] if a != b else []
    return not diff or diff[-1] - diff[0] < 32


@pytest.mark.slow
def test_the_fork_server_deploys_what_the_tools_deploy_as_subprocesses(compiled, tmp_path):
    """compile runs tpu-mlir's Python tools in the children of one fork server (the default): a block and the
    lm_head transformed and deployed as plain subprocesses give the same bmodels."""
    import shutil

    from tpugraph.compiler.plan import plan_compile
    from tpugraph.compiler.runner import run_step
    from tpugraph.tpu_mlir.toolchain import tool_environment

    venv, out, report = compiled
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("compile", "*.bmodel"))
    plan = plan_compile(copy, report.plan.options)
    from tpugraph.compiler.script import save_script
    from tpugraph.contract.manifest import read_manifest

    save_script(plan, read_manifest(copy), copy / plan.script_name)  # puts the transform driver in place
    env = tool_environment(venv)
    for name in ("block_0", "lm_head"):
        for step in (s for s in plan.steps if s.segment == name):
            rc, text, _ = run_step(step, copy, env, None)
            assert rc == 0, text[-2000:]
        ours = (out / report.plan.work_dir / name / f"{name}.bmodel").read_bytes()
        theirs = (copy / plan.work_dir / name / f"{name}.bmodel").read_bytes()
        assert _differ_in_one_short_span(ours, theirs), name
