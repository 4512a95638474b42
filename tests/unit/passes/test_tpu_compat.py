import onnx
import pytest

from tpugraph.errors import PassError, UsageError
from tpugraph.passes import PassContext, get_pass
from tpugraph.passes.make_tpu_compatible import TPU_MLIR_ONNX_OPS

from .conftest import assert_fails_cleanly, assert_same_outputs, ops, parse

OPSET_18 = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2, 7, 4] x) => (float[2, 1, 4] mean, float[2, 4, 4] a, float[2, 3, 4] b, float[1, 1, 1] total)
<int64[1] axis1 = {1}>
{
  mean = ReduceMean<keepdims = 1>(x, axis1)
  a, b = Split<axis = 1, num_outputs = 2>(x)
  total = ReduceMax<keepdims = 1>(x)
}
"""


def _opset18() -> onnx.ModelProto:
    model = parse(OPSET_18)
    model.graph.input[0].metadata_props.add(key="pkg.torch.onnx.name", value="x")  # IR 10 field
    return model


def _reduce(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op)


def test_brings_opset_18_ir_10_down_to_17_and_8():
    model = _opset18()
    out, result = get_pass("tpu_compat").run(model, PassContext(segment="block_0"))

    assert result.modified
    assert result.details["opset"] == [18, 17] and result.details["ir_version"] == [10, 8]
    assert result.details["converted_ops"] == {"ReduceMax": 1, "ReduceMean": 1, "Split": 1}
    assert result.details["metadata_stripped"] == 1
    assert out.ir_version == 8 and out.opset_import[0].version == 17
    mean = _reduce(out, "ReduceMean")
    assert list(mean.input) == ["x"]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in mean.attribute} == {"axes": [1], "keepdims": 1}
    assert "axes" not in {a.name for a in _reduce(out, "ReduceMax").attribute}  # reduce over all axes
    split = _reduce(out, "Split")
    assert "num_outputs" not in {a.name for a in split.attribute} and len(split.input) == 2  # uneven: 4 + 3
    assert not list(out.graph.input[0].metadata_props)
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(model, out)


def test_gelu_of_opset_20_becomes_erf_or_tanh_form():
    model = parse("""
    <ir_version: 9, opset_import: ["" : 20]>
    g (float[2, 8] x) => (float[2, 8] exact, float[2, 8] approx)
    { exact = Gelu(x)
      approx = Gelu<approximate = "tanh">(x) }
    """)
    out, result = get_pass("tpu_compat").run(model, PassContext())
    assert result.details["converted_ops"] == {"Gelu": 2}
    assert "Gelu" not in ops(out) and {"Erf", "Tanh"} <= set(ops(out))
    assert not result.details["unsupported_ops"]
    assert_same_outputs(model, out, atol=1e-5)


def test_compatible_model_is_left_alone():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2, 8] x, int64[2] ids) => (float[2, 1] y)
    { y = ReduceMean<axes = [1]>(x) }
    """)
    out, result = get_pass("tpu_compat").run(model, PassContext())
    assert not result.modified
    assert result.details["opset"] == [15, 15] and result.details["ir_version"] == [8, 8]
    assert out.SerializeToString() == model.SerializeToString()


def test_unsupported_ops_are_named():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15, "com.microsoft" : 1]>
    g (float[2, 8] x) => (float[2, 8] y, bool[2, 8] nan)
    { h = Hardmax(x)
      y = com.microsoft.FastGelu(h)
      nan = IsNaN(x) }
    """)
    err = assert_fails_cleanly(model, [get_pass("remove_identity"), get_pass("tpu_compat")],
                               PassContext(segment="lm_head"), "tpu_compat", "cannot convert: Hardmax x1, IsNaN x1, "
                               "com.microsoft::FastGelu x1")
    assert "tpu-mlir 1.30.2" in err.reason
    out, result = get_pass("tpu_compat", allow_unsupported_ops=True).run(model, PassContext())
    assert result.details["unsupported_ops"] == {"Hardmax": 1, "IsNaN": 1, "com.microsoft::FastGelu": 1}


def test_non_fp32_float_io_is_refused_unless_allowed():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float16[2] x, int32[2] ids) => (float16[2] y)
    { y = Relu(x) }
    """)
    with pytest.raises(PassError, match="float I/O must be float32: x is float16, y is float16"):
        get_pass("tpu_compat").run(model, PassContext())
    _, result = get_pass("tpu_compat", allow_non_fp32_io=True).run(model, PassContext())
    assert result.details["non_fp32_io"] == {"x": "float16", "y": "float16"}


def test_axes_computed_at_runtime_cannot_be_converted():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 8] x, int64[1] axes) => (float[2, 1] y)
    { y = ReduceMean(x, axes) }
    """)
    with pytest.raises(PassError, match="input 'axes' must be a constant"):
        get_pass("tpu_compat").run(model, PassContext())


def test_op_without_an_opset_17_form_is_refused():
    model = parse("""
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[2, 8] x, float[8] scale) => (float[2, 8] y)
    { y = RMSNormalization(x, scale) }
    """)
    with pytest.raises(PassError, match="'RMSNormalization' .* has no opset-17 form"):
        get_pass("tpu_compat").run(model, PassContext())


def test_op_list_is_the_tpu_mlir_frontend():
    assert len(TPU_MLIR_ONNX_OPS) == 129
    assert {"MatMul", "ReduceMean", "Softmax", "Trilu", "TopK", "LayerNormalization"} <= TPU_MLIR_ONNX_OPS
    assert "Gelu" not in TPU_MLIR_ONNX_OPS  # only its own fused "GELU"


def test_targets_above_17_are_usage_errors():
    with pytest.raises(UsageError, match="max_opset"):
        get_pass("tpu_compat", max_opset=18)
    with pytest.raises(UsageError, match="max_ir_version"):
        get_pass("tpu_compat", max_ir_version=10)


def test_unsupported_ops_helper_for_inspection():
    from tpugraph.passes.make_tpu_compatible import unsupported_ops

    assert unsupported_ops({"MatMul", "Gelu", "com.microsoft::FastGelu", "ai.onnx::Softmax"}) == {
        "Gelu", "com.microsoft::FastGelu"}
