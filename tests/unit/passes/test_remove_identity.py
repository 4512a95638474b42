from tpugraph.passes import PassContext, get_pass

from .conftest import assert_same_outputs, ops, parse

GRAPH = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[2, 3] x, float[2, 3] passthrough) => (float[2, 3] y, float[2, 3] z, float[2, 3] same, float[2, 3] lossy)
{
  a = Identity(x)
  b = Relu(a)
  c = Cast<to = 1>(b)
  d = Cast<to = 11>(c)
  e = Cast<to = 1>(d)
  f = Dropout(e)
  h = Neg(f)
  y = Identity(h)
  z = Identity(passthrough)
  same = Sigmoid(c)
  q = Cast<to = 10>(x)
  lossy = Cast<to = 1>(q)
}
"""


def test_removes_passthrough_nodes():
    model = parse(GRAPH)
    out, result = get_pass("remove_identity").run(model, PassContext(segment="s"))

    assert result.modified
    d = result.details
    assert (d["identity"], d["dropout"], d["cast_noop"], d["cast_round_trip"]) == (2, 1, 1, 1)
    assert d["kept_at_boundary"] == 1  # z = Identity(passthrough): two graph I/O names, one tensor
    assert d["dead_removed"] == 1  # the float -> double Cast the round trip made unused
    assert ops(out) == ["Relu", "Neg", "Identity", "Sigmoid", "Cast", "Cast"]
    neg = next(n for n in out.graph.node if n.op_type == "Neg")
    assert list(neg.output) == ["y"]  # the producer took over the graph output name
    assert [o.name for o in out.graph.output] == ["y", "z", "same", "lossy"]
    assert_same_outputs(model, out)


def test_lossy_round_trip_is_kept():
    out, _ = get_pass("remove_identity").run(parse(GRAPH), PassContext())
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert [c.output[0] for c in casts] == ["q", "lossy"]  # float -> float16 -> float rounds: kept


def test_casts_option_off_keeps_casts():
    out, result = get_pass("remove_identity", casts=False).run(parse(GRAPH), PassContext())
    assert result.details["cast_noop"] == result.details["cast_round_trip"] == 0
    assert ops(out).count("Cast") == 5


def test_nothing_to_remove_reports_unmodified():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2] x) => (float[2] y) { y = Relu(x) }
    """)
    out, result = get_pass("remove_identity").run(model, PassContext())
    assert not result.modified and result.details["removed"] == 0
    assert out.SerializeToString() == model.SerializeToString()


def test_input_to_output_identity_is_refused():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2] x) => (float[2] y) { y = Identity(x) }
    """)
    out, result = get_pass("remove_identity").run(model, PassContext())
    assert ops(out) == ["Identity"] and result.details["kept_at_boundary"] == 1 and not result.modified
