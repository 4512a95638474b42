"""The real consumer: tpu-mlir compiles the tiny preset's segments and checks them numerically (cmodel).

Needs the toolchain of scripts/setup_tpu_mlir.sh: found through $TPUGRAPH_TPU_MLIR_VENV, else at its default
location; skipped with the reason when absent. SEQ is 64 here (not the default 512): the compile time is
mostly the tools' own start-up, and a short window keeps the MLIR interpreter's compares quick.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import onnx
import pytest

from tpugraph.compiler import CompileOptions, SegmentCompileError, compile_segments, format_table
from tpugraph.contract.manifest import read_manifest
from tpugraph.errors import CompileError
from tpugraph.export.compare_inputs import write_test_data
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.tpu_mlir.guest import guest_script
from tpugraph.tpu_mlir.toolchain import tool_environment

pytestmark = pytest.mark.slow

SEQ = 64
MIN_COSINE = 0.99  # the tools' own default tolerance for F16 is 0.99 cosine
DEPLOYED = ("block_0", "block_cache_0", "embedding", "lm_head", "greedy_head")


@pytest.fixture(scope="module")
def compiled(toolchain, tmp_path_factory):
    """tiny-llama (default pass chain) with test data, compiled F16 for bm1684x: (out, report)."""
    out = tmp_path_factory.mktemp("tiny-llama-tpu") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ))
    write_test_data(out)
    try:
        report = compile_segments(out, toolchain, CompileOptions(chip="bm1684x", quantize="f16", check="all"), jobs=2)
    except SegmentCompileError as err:
        table = format_table(err.report.results) if err.report else ""
        pytest.fail(f"{err}\n{table}")
    print("\n" + report.table())
    return out, report


def test_every_segment_passes_transform_with_its_compare(compiled):
    out, report = compiled
    manifest = read_manifest(out)
    results = {r.segment: r for r in report.results}
    assert list(results) == [s.name for s in manifest.segments]
    for seg in manifest.segments:
        r = results[seg.name]
        assert r.checked and r.transform_ok, seg.name
        assert r.transform_similarity is not None and r.transform_similarity >= MIN_COSINE, (seg.name, r)


def test_segments_pass_deploy_on_the_cmodel(compiled):
    _, report = compiled
    results = {r.segment: r for r in report.results}
    for name in DEPLOYED:
        r = results[name]
        assert r.deploy_ok, name
        assert r.deploy_similarity is not None and r.deploy_similarity >= MIN_COSINE, (name, r)


def test_combined_bmodel_has_every_net(compiled, toolchain):
    out, report = compiled
    assert report.passed
    assert report.bmodel == out.resolve() / f"llama_f16_seq{SEQ}_bm1684x_1dev.bmodel"
    info = subprocess.run([str(toolchain / "bin" / "model_tool"), "--info", str(report.bmodel)],
                          capture_output=True, text=True, check=True).stdout
    for seg in read_manifest(out).segments:
        assert f"[{seg.name}]" in info
    assert "addr mode: 1" in info  # io_alone for the decode blocks


def test_a_rejected_segment_names_itself_and_the_reason(compiled, toolchain, tmp_path):
    """An opset-18 ReduceMean (which tpu-mlir 1.30 rejects) in place of greedy_head, in an output of its own."""
    src, _ = compiled
    out = tmp_path / "out"
    out.mkdir()
    manifest = read_manifest(src)
    vocab = manifest.model.vocab_size
    bad = onnx.parser.parse_model(f"""
        < ir_version: 8, opset_import: ["" : 18] >
        greedy (float[1,{vocab}] m_logits) => (int32[1,1] token) {{
            axes = Constant <value = int64[1] {{1}}> ()
            mean = ReduceMean <keepdims = 1> (m_logits, axes)
            centered = Sub(m_logits, mean)
            index = ArgMax <axis = 1, keepdims = 1> (centered)
            token = Cast <to = 6> (index)
        }}""")
    onnx.save(bad, str(out / "greedy_head.onnx"))
    manifest.segments = [manifest.segment("greedy_head")]
    manifest.write(out)
    (out / "test_data").mkdir()
    shutil.copy(src / "test_data" / "greedy_head_input.npz", out / "test_data")
    with pytest.raises(CompileError) as info:
        compile_segments(out, toolchain, CompileOptions())
    err = info.value
    assert err.exit_code == 8 and err.segment == "greedy_head" and err.action == "transform"
    assert "Unsupport opset for ReduceMean" in err.reason
    assert "segment 'greedy_head'" in str(err)


# ------------------------------------------------------------------------------ Top fusions (tpu_mlir_transform)

_RETURN = re.compile(r"^\s*return (.*?) :", re.M)


def _output_names(mlir: str) -> list[str]:
    """The names (locations) of a Top module's outputs, as the bmodel will call them."""
    locs = dict(re.findall(r'^#(loc\d+) = loc\("([^"]*)"\)', mlir, re.M))
    names = []
    for value in _RETURN.search(mlir).group(1).split(", "):
        line = re.search(rf"^\s*{re.escape(value)} = .*loc\(#(loc\d+)\)$", mlir, re.M)
        names.append(locs[line.group(1)])
    return names


@pytest.mark.parametrize("segment", ["block_0", "block_cache_0"])
def test_blocks_reach_the_backend_as_rope_and_flash_attention(compiled, segment):
    """tpu-mlir's front end leaves rotary and attention unfused; the transform driver hands the backend
    top.Rope and top.FAttention (as llm_convert.py writes them), proven equal to the unfused module."""
    out, _ = compiled
    work = out / "compile" / "f16_bm1684x_1dev" / segment
    fused, unfused = (work / f"{segment}.mlir").read_text(), (work / f"{segment}_unfused.mlir").read_text()
    assert fused.count('"top.Rope"') == 2 and fused.count('"top.FAttention"') == 1
    assert '"top.Softmax"' not in fused and '"top.Tile"' not in fused
    assert '"top.Softmax"' in unfused and '"top.Rope"' not in unfused
    log = (work / "transform.log").read_text()
    assert "tpugraph fusion: rope 2, attention 1" in log
    check = re.search(r"tpugraph fusion check: fused vs unfused outputs, min cosine ([0-9.]+) \(ok\)", log)
    assert check and float(check.group(1)) >= 0.99999
    assert _output_names(fused) == _output_names(unfused)  # the nets' outputs keep their names


def test_the_fusion_check_catches_a_wrong_fusion(compiled, toolchain, tmp_path):
    """A fused module that computes something else (the attention scale doubled) fails the driver's check."""
    out, _ = compiled
    work = out / "compile" / "f16_bm1684x_1dev" / "block_0"
    for name in ("block_0_unfused.mlir", "block_0_top_f32_all_weight.npz"):
        shutil.copy(work / name, tmp_path / name)
    fused = (work / "block_0.mlir").read_text()
    scale = re.search(r'"top.FAttention".*?scale = ([0-9.eE+-]+) : f64', fused).group(1)
    (tmp_path / "block_0.mlir").write_text(fused.replace(f"scale = {scale} : f64", f"scale = {2 * float(scale)!r} : f64"))
    driver = guest_script("tpu_mlir_transform.py")
    code = (f"import sys; sys.path.insert(0, {str(driver.parent)!r}); import tpu_mlir, tpu_mlir_transform as t; "
            f"print('COSINE', t.check_fusion('block_0.mlir', {str(out / 'test_data' / 'block_0_input.npz')!r}))")
    run = subprocess.run([str(toolchain / "bin" / "python3"), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    cosine = float(re.search(r"COSINE ([0-9.eE+-]+)", run.stdout).group(1))
    assert cosine < 0.99999


@pytest.mark.parametrize("segment", ["block_cache_0", "lm_head"])
def test_an_already_simplified_graph_skips_tpu_mlirs_onnxsim_for_the_same_mlir(compiled, toolchain, tmp_path, segment):
    """compile passes --skip-onnxsim for segments that went through tpugraph's folding and onnxsim: the Top MLIR
    and its weights are the ones tpu-mlir's own re-simplification gives."""
    import numpy as np

    from tpugraph.compiler.plan import plan_compile

    out, report = compiled
    step = next(s for s in plan_compile(out, report.plan.options).steps
                if s.segment == segment and s.action == "transform")
    assert "--skip-onnxsim" in step.argv
    driver = guest_script("tpu_mlir_transform.py")
    model_def = step.argv[step.argv.index("--model_def") + 1].replace("{OUT}", str(out))
    logs = {}
    for mode in ("skip", "sim"):
        folder = tmp_path / mode
        folder.mkdir()
        argv = [str(toolchain / "bin" / "python3"), str(driver), *(["--skip-onnxsim"] if mode == "skip" else []),
                "--model_name", segment, "--model_def", model_def, "--mlir", f"{segment}.mlir"]
        run = subprocess.run(argv, cwd=folder, env=tool_environment(toolchain), capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        logs[mode] = run.stdout + run.stderr
    assert "Onnxsim opt finished" in logs["sim"] and "Onnxsim opt finished" not in logs["skip"]
    assert (tmp_path / "skip" / f"{segment}.mlir").read_text() == (tmp_path / "sim" / f"{segment}.mlir").read_text()
    weights = f"{segment}_top_f32_all_weight.npz"
    with np.load(tmp_path / "skip" / weights) as a, np.load(tmp_path / "sim" / weights) as b:
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
