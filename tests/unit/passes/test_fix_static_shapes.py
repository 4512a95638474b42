import onnx
import pytest

from tpugraph.errors import PassError, UsageError
from tpugraph.passes import PassContext, get_pass

from .conftest import assert_fails_cleanly, assert_same_outputs, feeds_for, ops, parse, shapes_of

DYNAMIC = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[1, seq, 8] x, int64[1, seq] pos) => (float[1, seq, 2, 4] y, float[1, seq, 8] z, int64[1, seq] r)
<int64[1] zero = {0}, int64[1] one = {1}, int64[2] tail = {2, 4}, int64 start = {0}, int64 step = {1}>
{
  shp = Shape(x)
  b = Gather(shp, zero)
  s = Gather(shp, one)
  new_shape = Concat<axis=0>(b, s, tail)
  y = Reshape(x, new_shape)
  ones = ConstantOfShape<value = float[1] {1.0}>(shp)
  z = Add(x, ones)
  ps = Shape(pos)
  n = Gather<axis=0>(ps, one)
  n0 = Squeeze(n, zero)
  rng = Range(start, n0, step)
  r1 = Unsqueeze(rng, zero)
  r = Add(pos, r1)
}
"""
SPEC = {"x": (1, 4, 8), "pos": (1, 4), "y": (1, 4, 2, 4), "z": (1, 4, 8), "r": (1, 4)}


def test_pins_io_and_folds_shape_chains():
    model = parse(DYNAMIC)
    out, result = get_pass("fix_static_shapes").run(model, PassContext(segment="seg", shapes=SPEC))

    assert result.modified
    assert result.details["dims_fixed"] == 5
    assert result.details["folded"]["Shape"] == 2
    assert result.details["folded"]["ConstantOfShape"] == 1
    assert result.details["folded"]["Range"] == 1
    assert result.nodes_after < result.nodes_before
    assert shapes_of(out) == SPEC
    assert not {"Shape", "Gather", "Concat", "ConstantOfShape", "Range"} & set(ops(out))
    assert sorted(ops(out)) == ["Add", "Add", "Reshape"]
    for v in out.graph.value_info:
        assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), v
    assert_same_outputs(model, out, feeds_for(model, SPEC))


def test_second_run_changes_nothing():
    ctx = PassContext(shapes=SPEC)
    once, _ = get_pass("fix_static_shapes").run(parse(DYNAMIC), ctx)
    twice, result = get_pass("fix_static_shapes").run(once, ctx)
    assert not result.modified
    assert result.details["folded_total"] == 0 and result.details["dims_fixed"] == 0
    assert twice.SerializeToString() == once.SerializeToString()


def test_spec_contradicting_the_graph_fails_and_leaves_model():
    model = parse(DYNAMIC.replace("float[1, seq, 8] x", "float[1, 5, 8] x"))
    err = assert_fails_cleanly(model, [get_pass("remove_unused"), get_pass("fix_static_shapes")],
                               PassContext(segment="block_2", shapes=SPEC), "fix_static_shapes",
                               "'x' dim 1 is 5 in the graph but the spec says 4")
    assert err.before == ["remove_unused"]


def test_value_that_stays_dynamic_is_named():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2, 3] x) => (int64[2] n)
    {
      nz = NonZero(x)
      n = Shape(nz)
    }
    """)
    with pytest.raises(PassError) as info:
        get_pass("fix_static_shapes").run(model, PassContext(segment="s", shapes={"x": (2, 3), "n": (2,)}))
    assert "stay dynamic" in info.value.reason and "nz (NonZero" in info.value.reason


def test_spec_names_missing_from_graph_fail():
    with pytest.raises(PassError, match="the segment spec names nope"):
        get_pass("fix_static_shapes").run(parse(DYNAMIC), PassContext(shapes={**SPEC, "nope": (1,)}))


def test_dynamic_io_without_spec_fails():
    with pytest.raises(PassError, match="x, pos, y, z, r has dynamic dims"):
        get_pass("fix_static_shapes").run(parse(DYNAMIC), PassContext())


def test_bad_option_is_a_usage_error():
    with pytest.raises(UsageError, match="max_rounds"):
        get_pass("fix_static_shapes", max_rounds=0)
    with pytest.raises(UsageError, match="has no option 'rounds'"):
        get_pass("fix_static_shapes", rounds=3)


def test_large_folds_are_left_to_the_graph():
    model = parse(DYNAMIC)
    out, result = get_pass("fix_static_shapes", max_fold_bytes=64).run(model, PassContext(shapes=SPEC))
    # the ConstantOfShape of [1, 4, 8] floats (128 bytes) stays a computation, shapes are still static
    assert "ConstantOfShape" in ops(out)
    assert "ConstantOfShape" not in result.details["folded"]
    assert isinstance(out, onnx.ModelProto)
    assert_same_outputs(model, out, feeds_for(model, SPEC))
