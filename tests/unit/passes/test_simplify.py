import onnx
import pytest
from onnx import helper

from tpugraph.errors import PassError
from tpugraph.passes import PassContext, get_pass

from .conftest import assert_fails_cleanly, assert_same_outputs, ops, parse

REDUNDANT = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[1, 4, 8] x) => (float[1, 4, 8] y)
<int64[2] flat = {4, 8}, int64[3] back = {1, 4, 8}>
{
  a = Identity(x)
  t1 = Transpose<perm = [0, 2, 1]>(a)
  t2 = Transpose<perm = [0, 2, 1]>(t1)
  r1 = Reshape(t2, flat)
  r2 = Reshape(r1, back)
  y = Relu(r2)
}
"""


def test_removes_redundant_ops():
    model = parse(REDUNDANT)
    out, result = get_pass("simplify").run(model, PassContext(segment="lm_head"))

    assert result.modified
    assert result.details["via_file"] is False
    assert result.details["nodes_removed"] == result.nodes_before - result.nodes_after > 0
    assert "Transpose" not in ops(out) and "Identity" not in ops(out)
    assert "Relu" in ops(out)
    assert not [p for p in out.metadata_props if p.key.startswith("onnxsim.")]
    assert [o.name for o in out.graph.output] == ["y"]
    assert_same_outputs(model, out)


def test_input_model_is_not_changed():
    model = parse(REDUNDANT)
    before = model.SerializeToString()
    get_pass("simplify").run(model, PassContext())
    assert model.SerializeToString() == before


def test_big_models_go_through_a_file(tmp_path):
    model = parse(REDUNDANT)
    work = tmp_path / "work"
    out, result = get_pass("simplify", large_model_bytes=0).run(model, PassContext(work_dir=work))
    assert result.details["via_file"] is True
    in_memory, _ = get_pass("simplify").run(model, PassContext())
    assert ops(out) == ops(in_memory)
    assert not any(work.iterdir())  # scratch files removed
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in out.graph.initializer)
    assert_same_outputs(model, out)


def test_already_simple_graph_is_unchanged():
    simple, _ = get_pass("simplify").run(parse(REDUNDANT), PassContext())
    again, result = get_pass("simplify").run(simple, PassContext())
    assert not result.modified
    assert result.nodes_before == result.nodes_after


def test_invalid_graph_fails_cleanly():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], alpha=1.0)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    err = assert_fails_cleanly(model, [get_pass("remove_unused"), get_pass("remove_identity"), get_pass("simplify")],
                               PassContext(segment="block_cache_1"), "simplify", "Unrecognized attribute: alpha")
    assert isinstance(err, PassError)


def test_unknown_option_is_rejected():
    with pytest.raises(Exception, match="skip_fuse"):
        get_pass("simplify", skip_fuse=True)
