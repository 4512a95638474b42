import onnx
import pytest

from tpugraph.errors import UsageError
from tpugraph.passes import PassContext, get_pass

from .conftest import assert_same_outputs, ops, parse

GRAPH = """
<ir_version: 8, opset_import: ["" : 15, "local" : 1]>
g (float[2] x, int64[2] unused_input) => (float[2] y)
<float[2] used = {1.0, 2.0}, float[2] orphan = {3.0, 4.0}>
{
  a = Add(x, used)
  dead1 = Mul(x, orphan)
  dead2 = Neg(dead1)
  y = local.Double(a)
}

<domain: "local", opset_import: ["" : 15]>
Double (t) => (u) { u = Add(t, t) }

<domain: "local", opset_import: ["" : 15]>
Never (t) => (u) { u = Neg(t) }
"""


def _model() -> onnx.ModelProto:
    model = parse(GRAPH)
    stale = onnx.helper.make_tensor_value_info("dead2", onnx.TensorProto.FLOAT, [2])
    model.graph.value_info.extend([stale, onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [2])])
    return model


def test_removes_what_nothing_reads():
    model = _model()
    out, result = get_pass("remove_unused").run(model, PassContext())
    assert result.modified
    assert result.details == {"nodes": 2, "initializers": 1, "value_info": 1, "functions": 1}
    assert ops(out) == ["Add", "Double"]
    assert [t.name for t in out.graph.initializer] == ["used"]
    assert [v.name for v in out.graph.value_info] == ["a"]
    assert [f.name for f in out.functions] == ["Double"]
    assert_same_outputs(model, out)


def test_graph_inputs_are_kept_even_when_unused():
    out, _ = get_pass("remove_unused").run(_model(), PassContext())
    assert [v.name for v in out.graph.input] == ["x", "unused_input"]


def test_clean_graph_is_unmodified():
    clean, _ = get_pass("remove_unused").run(_model(), PassContext())
    again, result = get_pass("remove_unused").run(clean, PassContext())
    assert not result.modified and result.details == {"nodes": 0, "initializers": 0, "value_info": 0, "functions": 0}


def test_takes_no_options():
    with pytest.raises(UsageError, match="options: none"):
        get_pass("remove_unused", aggressive=True)
