import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tpugraph.errors import UsageError
from tpugraph.passes import PassContext, get_pass

from .conftest import assert_same_outputs


def _model(extra_inputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """y = (((x + a) * b) - c) + d + r, with a == b == c (float), d same bytes as int, r reshaped."""
    base = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
    inits = [
        numpy_helper.from_array(base, "a"),
        numpy_helper.from_array(base.copy(), "b"),
        numpy_helper.from_array(base.copy(), "c"),
        numpy_helper.from_array(base.view(np.int32), "d_bits"),  # same bytes, other type: distinct
        numpy_helper.from_array(base.reshape(4, 2), "r"),  # same bytes, other dims: distinct
    ]
    nodes = [
        helper.make_node("Add", ["x", "a"], ["t1"]),
        helper.make_node("Mul", ["t1", "b"], ["t2"]),
        helper.make_node("Sub", ["t2", "c"], ["t3"]),
        helper.make_node("Cast", ["d_bits"], ["d"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Add", ["t3", "d"], ["t4"]),
        helper.make_node("Reshape", ["r", "shape"], ["r2"]),
        helper.make_node("Add", ["t4", "r2"], ["y"]),
    ]
    inits.append(numpy_helper.from_array(np.array([2, 4], dtype=np.int64), "shape"))
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])]
    inputs += [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 4]) for n in extra_inputs]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def test_merges_identical_initializers():
    model = _model()
    out, result = get_pass("dedupe_initializers").run(model, PassContext())
    assert result.modified
    assert result.details == {"merged": 2, "groups": 1, "bytes_saved": 64}
    assert [t.name for t in out.graph.initializer] == ["a", "d_bits", "r", "shape"]
    assert [list(n.input) for n in out.graph.node[:3]] == [["x", "a"], ["t1", "a"], ["t2", "a"]]
    assert_same_outputs(model, out)


def test_overridable_initializers_are_never_merged():
    model = _model(extra_inputs=("b",))  # b is also a graph input: the runtime may feed it
    out, result = get_pass("dedupe_initializers").run(model, PassContext())
    assert result.details["merged"] == 1
    assert {t.name for t in out.graph.initializer} == {"a", "b", "d_bits", "r", "shape"}


def test_size_limit_skips_big_tensors():
    out, result = get_pass("dedupe_initializers", max_bytes=16).run(_model(), PassContext())
    assert result.details["merged"] == 0 and not result.modified
    assert len(out.graph.initializer) == 6


def test_negative_limit_is_a_usage_error():
    with pytest.raises(UsageError):
        get_pass("dedupe_initializers", max_bytes=-1)
