import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tpugraph.errors import UsageError
from tpugraph.passes import PassContext, get_pass

from .conftest import assert_fails_cleanly, assert_same_outputs, ops, parse

CONSTANT_CHAIN = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[2, 4] x) => (float[2, 4] y)
<float[4, 4] w = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}>
{
  two = Constant<value = float {2.0}>()
  half = Constant<value = float {0.5}>()
  w2 = Mul(w, two)
  w3 = Mul(w2, half)
  wt = Transpose<perm = [1, 0]>(w3)
  y = MatMul(x, wt)
}
"""


def test_folds_constant_subgraphs_into_initializers():
    model = parse(CONSTANT_CHAIN)
    out, result = get_pass("fold_constants").run(model, PassContext(segment="s"))

    assert result.modified
    assert result.details["constant_nodes_lowered"] == 2
    assert result.details["constants_created"] == 1  # wt; w2 and w3 were only intermediate
    assert result.details["nodes_removed"] == 5
    assert result.nodes_before == 6 and result.nodes_after == 1
    assert ops(out) == ["MatMul"]
    assert len(out.graph.initializer) == 1
    assert out.ir_version == model.ir_version and out.opset_import == model.opset_import
    assert_same_outputs(model, out)


def test_input_model_is_not_changed():
    model = parse(CONSTANT_CHAIN)
    before = model.SerializeToString()
    get_pass("fold_constants").run(model, PassContext())
    assert model.SerializeToString() == before


def _weight_model(weight: np.ndarray, shared: bool) -> onnx.ModelProto:
    """y = x @ W^T (+ x @ W when shared): W read by a foldable Transpose."""
    n = weight.shape[0]
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["a"])]
    if shared:
        nodes += [helper.make_node("MatMul", ["x", "W"], ["b"]), helper.make_node("Add", ["a", "b"], ["y"])]
    else:
        nodes += [helper.make_node("Identity", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def test_shared_weight_is_never_duplicated():
    weight = np.random.default_rng(0).standard_normal((160, 160)).astype(np.float32)  # 100 KB
    model = _weight_model(weight, shared=True)
    out, result = get_pass("fold_constants").run(model, PassContext())
    assert "Transpose" in ops(out)
    assert result.details["excluded_weight_readers"] == 1
    assert _weight_bytes(out) == _weight_bytes(model)
    assert_same_outputs(model, out, atol=1e-4)


def test_unshared_weight_folds_below_the_threshold_only():
    weight = np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32)  # 4 KB
    model = _weight_model(weight, shared=False)

    folded, result = get_pass("fold_constants").run(model, PassContext())
    assert "Transpose" not in ops(folded) and result.details["constants_created"] == 1
    assert _weight_bytes(folded) == _weight_bytes(model)  # the original is gone, not kept beside the copy
    assert_same_outputs(model, folded)

    kept, result = get_pass("fold_constants", size_threshold=1024).run(model, PassContext())
    assert "Transpose" in ops(kept) and result.details["constants_created"] == 0
    assert result.details["excluded_weight_readers"] == 1


def test_cyclic_graph_fails_cleanly():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
         helper.make_node("Identity", ["b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    assert_fails_cleanly(model, [get_pass("remove_identity"), get_pass("fold_constants")],
                         PassContext(segment="embedding"), "fold_constants", "ycle")


def test_negative_threshold_is_a_usage_error():
    with pytest.raises(UsageError):
        get_pass("fold_constants", size_threshold=-1)
