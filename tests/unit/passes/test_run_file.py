import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tpugraph.errors import CheckFailedError, ModelError, PassError, UsageError
from tpugraph.passes import PASSES, GraphPass, _graph, run_passes_on_file
from tpugraph.passes.run_file import context_for_file

from .conftest import ops, parse

BLOCK = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[1, 4, 8] input_states, int64[1, 4] position_ids) => (float[1, 4, 8] hidden_states)
<float[8] scale = {1, 1, 1, 1, 2, 2, 2, 2}, int64[1] last = {2}>
{
  a = Identity(input_states)
  p = Cast<to = 1>(position_ids)
  p3 = Unsqueeze(p, last)
  s = Mul(a, scale)
  hidden_states = Add(s, p3)
}
"""


@pytest.fixture
def block_file(tmp_path):
    path = tmp_path / "block_3.onnx"
    onnx.save(parse(BLOCK), path)
    return path


def test_runs_passes_and_checks(block_file, tmp_path):
    out_path = tmp_path / "out" / "block_3.onnx"
    before = block_file.read_bytes()
    report = run_passes_on_file(block_file, out_path, "fix_static_shapes,remove_identity", check=True)

    assert block_file.read_bytes() == before
    assert report.chain == ["fix_static_shapes", "remove_identity"]
    assert report.max_abs_diff == {"hidden_states": 0.0}
    assert [r.name for r in report.results] == report.chain
    assert report.results[1].details["identity"] == 1
    assert json.loads(json.dumps(report.to_json()))["options"]["fix_static_shapes"]["max_rounds"] == 8
    out = onnx.load(out_path)
    assert "Identity" not in ops(out)
    assert [p.name for p in out_path.parent.iterdir()] == ["block_3.onnx"]  # no temp leftovers


def test_context_from_the_file_name(block_file):
    ctx = context_for_file(block_file, parse(BLOCK))
    assert (ctx.segment, ctx.layer, ctx.kind) == ("block_3", 3, "block")
    assert ctx.shapes == {"input_states": (1, 4, 8), "position_ids": (1, 4), "hidden_states": (1, 4, 8)}
    cache = context_for_file(block_file.with_name("block_cache_12.onnx"), parse(BLOCK))
    assert (cache.layer, cache.kind) == (12, "block_cache")
    assert context_for_file(block_file.with_name("lm_head.onnx"), parse(BLOCK)).kind == "lm_head"


def test_failing_pass_writes_nothing(block_file, tmp_path):
    model = parse(BLOCK.replace("hidden_states = Add(s, p3)", "h = Add(s, p3)\n  hidden_states = Hardmax(h)"))
    onnx.save(model, block_file)  # Hardmax: not in tpu-mlir's frontend, tpu_compat refuses
    out_path = tmp_path / "out.onnx"
    before = block_file.read_bytes()
    with pytest.raises(PassError) as info:
        run_passes_on_file(block_file, out_path, ["remove_identity", "tpu_compat"], check=False)
    assert info.value.pass_name == "tpu_compat" and info.value.before == ["remove_identity"]
    assert info.value.segment == "block_3"
    assert not out_path.exists() and not list(tmp_path.glob(".out.onnx*"))
    assert block_file.read_bytes() == before


def test_check_failure_writes_nothing(block_file, tmp_path, monkeypatch):
    class Skew(GraphPass):
        name = "skew"
        summary = "doubles a weight"

        def apply(self, model, ctx):
            t = model.graph.initializer[0]
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2, t.name))
            return model, {}

    monkeypatch.setitem(PASSES, "skew", Skew)
    out_path = tmp_path / "skewed.onnx"
    with pytest.raises(CheckFailedError, match="hidden_states: .* not written") as info:
        run_passes_on_file(block_file, out_path, ["skew"], check=True, tolerance=1e-3)
    assert info.value.exit_code == 1  # a check that ran and failed, as a verify FAIL
    assert not out_path.exists()


def test_big_outputs_get_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(_graph, "LARGE_MODEL_BYTES", 0)  # every model counts as big
    weight = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("MatMul", ["i", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "lm_head.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8), path)
    out_path = tmp_path / "out.onnx"
    report = run_passes_on_file(path, out_path, ["remove_identity"], check=True)
    assert report.max_abs_diff == {"y": 0.0}
    assert (tmp_path / "out.onnx.data").stat().st_size == weight.nbytes
    stored = onnx.load(out_path, load_external_data=False).graph.initializer[0]
    assert stored.data_location == onnx.TensorProto.EXTERNAL
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(out_path).graph.initializer[0]), weight)


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="no such file"):  # a missing input is a model error (exit 3) everywhere
        run_passes_on_file(tmp_path / "missing.onnx", tmp_path / "o.onnx", ["simplify"])
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(ModelError) as info:
        run_passes_on_file(junk, tmp_path / "o.onnx", ["simplify"])
    assert "\n" not in str(info.value) and "junk.onnx" in str(info.value)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="not an ONNX model"):
        run_passes_on_file(empty, tmp_path / "o.onnx", ["simplify"])
    with pytest.raises(UsageError, match="unknown pass 'simplfy'"):
        run_passes_on_file(junk, tmp_path / "o.onnx", "simplfy")


def test_check_needs_a_runnable_static_input(tmp_path):
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(parse(BLOCK.replace("float[1, 4, 8] input_states", "float[1, n, 8] input_states")), dynamic)
    with pytest.raises(UsageError, match="--check needs static input shapes: input 'input_states'"):
        run_passes_on_file(dynamic, tmp_path / "o.onnx", ["remove_identity"], check=True)
    custom = tmp_path / "custom.onnx"
    model = parse(BLOCK)
    model.graph.node[0].op_type = "NotAnOp"
    onnx.save(model, custom)
    with pytest.raises(ModelError, match="custom.onnx does not run in onnxruntime"):
        run_passes_on_file(custom, tmp_path / "o.onnx", ["remove_unused"], check=True)
    assert not (tmp_path / "o.onnx").exists()


def test_unwritable_output_is_an_output_error(block_file, tmp_path):
    from tpugraph.errors import OutputError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write"):
        run_passes_on_file(block_file, blocker / "out.onnx", ["remove_unused"])
