import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tpugraph.errors import PassError, UsageError
from tpugraph.passes import (
    DEFAULT_CHAIN,
    PASSES,
    GraphPass,
    PassContext,
    default_chain,
    get_pass,
    resolve_chain,
    run_chain,
)

from .conftest import assert_fails_cleanly, assert_same_outputs, export_tiny_llama_block, ops, parse

SMALL = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[1, 4] x) => (float[1, 4] y)
<float[4] a = {1, 2, 3, 4}, float[4] b = {1, 2, 3, 4}, float[4] unused = {0, 0, 0, 0}>
{
  i = Identity(x)
  s = Add(i, a)
  y = Mul(s, b)
}
"""


def test_every_registered_pass_has_a_test_module():
    here = Path(__file__).parent
    missing = [name for name in PASSES if not (here / f"test_{name}.py").is_file()]
    assert not missing, f"passes without tests/unit/passes/test_<name>.py: {missing}"


def test_registry_entries_describe_themselves():
    for name, cls in PASSES.items():
        assert cls.name == name and cls.summary and "\n" not in cls.summary
        p = cls()
        json.dumps(p.options())
        assert p.options() == json.loads(json.dumps(p.options()))


def test_default_chain_order():
    assert [p.name for p in default_chain()] == list(DEFAULT_CHAIN) == [
        "fix_static_shapes", "fold_constants", "simplify", "remove_identity", "dedupe_initializers",
        "remove_unused", "rename_kv_io", "tpu_compat"]
    assert set(DEFAULT_CHAIN) == set(PASSES)


def test_resolve_chain():
    assert [p.name for p in resolve_chain(None, None)] == list(DEFAULT_CHAIN)
    assert [p.name for p in resolve_chain(["simplify,tpu_compat", "remove_unused"])] == [
        "simplify", "tpu_compat", "remove_unused"]
    assert "simplify" not in [p.name for p in resolve_chain(None, ["simplify"])]
    with pytest.raises(UsageError) as info:
        resolve_chain(["simplify", "optimise"])
    assert str(info.value).startswith("unknown pass 'optimise' (passes: fix_static_shapes, fold_constants,")
    with pytest.raises(UsageError, match="unknown pass 'nope'"):
        resolve_chain(None, ["nope"])
    with pytest.raises(UsageError, match="unknown pass 'x'"):
        get_pass("x")


def test_chain_results_and_input_untouched():
    model = parse(SMALL)
    before = model.SerializeToString()
    chain = resolve_chain(["remove_identity", "dedupe_initializers", "remove_unused"])
    out, results = run_chain(model, chain, PassContext(segment="s"))
    assert model.SerializeToString() == before
    assert [r.name for r in results] == ["remove_identity", "dedupe_initializers", "remove_unused"]
    assert [r.modified for r in results] == [True, True, True]
    assert [(r.nodes_before, r.nodes_after) for r in results] == [(3, 2), (2, 2), (2, 2)]
    assert results[1].details["merged"] == 1 and results[2].details["initializers"] == 1
    assert ops(out) == ["Add", "Mul"]
    record = json.loads(json.dumps([r.to_json() for r in results]))
    assert set(record[0]) == {"name", "modified", "nodes_before", "nodes_after", "seconds", "details"}
    assert_same_outputs(model, out)


def test_failure_names_pass_segment_and_previous_passes():
    class Explode(GraphPass):
        name = "explode"
        summary = "always fails"

        def apply(self, model, ctx):
            del model.graph.node[:]  # damage the working copy first: the caller must not see it
            raise RuntimeError("boom\nsecond line")

    model = parse(SMALL)
    chain = [get_pass("remove_identity"), get_pass("remove_unused"), Explode()]
    err = assert_fails_cleanly(model, chain, PassContext(segment="block_cache_7"), "explode", "RuntimeError: boom")
    assert str(err) == ("pass 'explode' failed on segment 'block_cache_7' (passes run before it: remove_identity, "
                        "remove_unused): RuntimeError: boom")
    assert err.exit_code == 6


def test_check_numerics_catches_a_pass_that_changes_results():
    class Skew(GraphPass):
        name = "skew"
        summary = "changes a constant"

        def apply(self, model, ctx):
            model.graph.initializer[0].raw_data = np.full(4, 9, np.float32).tobytes()
            model.graph.initializer[0].ClearField("float_data")
            return model, {}

    ctx = PassContext(segment="s", check_numerics=True, tolerance=1e-6)
    out, results = run_chain(parse(SMALL), [get_pass("remove_identity")], ctx)
    assert results[0].details["max_abs_diff"] == {"y": 0.0}
    with pytest.raises(PassError, match="numeric check failed: output 'y' max abs diff"):
        run_chain(parse(SMALL), [get_pass("remove_identity"), Skew()], ctx)


@pytest.fixture(scope="module", params=["static", "dynamic"])
def exported_block(request, tmp_path_factory, tiny_block):
    """The tiny Llama block as the exporter writes it, and the same export with a symbolic sequence."""
    if request.param == "static":
        return tiny_block
    import warnings

    import torch

    original = torch.onnx.export

    def export_dynamic(*args, **kwargs):
        seq = {1: "seq"}
        kwargs["dynamic_axes"] = {"input_states": seq, "position_ids": seq, "attention_mask": {2: "seq", 3: "seq"},
                                  "hidden_states": seq, "past_k": seq, "past_v": seq}
        return original(*args, **kwargs)

    path = tmp_path_factory.mktemp("dynamic") / "block_0.onnx"
    torch.onnx.export = export_dynamic
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shapes = export_tiny_llama_block(path)
    finally:
        torch.onnx.export = original
    return path, shapes


def test_default_chain_on_a_real_llama_block(exported_block):
    import onnxsim

    path, shapes = exported_block
    model = onnx.load(path)
    before = model.SerializeToString()
    ctx = PassContext(segment="block_0", shapes=shapes, layer=0, kind="block")
    out, results = run_chain(model, default_chain(), ctx)

    assert model.SerializeToString() == before
    assert [r.name for r in results] == list(DEFAULT_CHAIN)
    assert "Shape" not in ops(out)
    for v in (*out.graph.input, *out.graph.output, *out.graph.value_info):
        assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), v.name
    assert out.opset_import[0].version <= 17 and out.ir_version <= 9
    static_inputs = {k: list(v) for k, v in shapes.items() if k in ("input_states", "position_ids", "attention_mask")}
    alone, _ = onnxsim.simplify(model, check_n=0, overwrite_input_shapes=static_inputs)
    assert len(out.graph.node) <= len(alone.graph.node)
    assert [v.name for v in out.graph.input] == ["input_states", "position_ids", "attention_mask"]
    assert [v.name for v in out.graph.output] == ["hidden_states", "past_k", "past_v"]
    assert_same_outputs(_pin(model, shapes), out, atol=1e-5)
    onnx.checker.check_model(out, full_check=True)


def _pin(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """The export with its inputs pinned to the spec, so random test data can be made for it."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for v in pinned.graph.input:
        for d, w in zip(v.type.tensor_type.shape.dim, shapes[v.name]):
            d.Clear()
            d.dim_value = w
    return pinned


def test_shape_work_never_needs_the_weights(tiny_block, monkeypatch):
    """Big segments: inference runs on a skeleton whose weights are payload-free stubs."""
    from tpugraph.passes import _graph

    monkeypatch.setattr(_graph, "_SKELETON_MIN_BYTES", 1)
    path, shapes = tiny_block
    model = onnx.load(path)
    chain = resolve_chain(["fix_static_shapes", "remove_identity", "tpu_compat"])
    out, results = run_chain(model, chain, PassContext(segment="block_0", shapes=shapes, layer=0))
    assert results[0].details["value_info"] > 50
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in out.graph.initializer)
    assert_same_outputs(model, out)


def test_the_pass_contract_imports_no_pass_module():
    import subprocess
    import sys

    code = ("import sys, tpugraph.passes.base; "
            "print(sorted(m for m in sys.modules if m.startswith('tpugraph.passes.') "
            "and m.rsplit('.', 1)[1] not in ('base', '_graph')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fold_constants_declares_and_returns_a_new_model():
    model = parse(SMALL)
    p = get_pass("fold_constants")
    assert p.in_place is False
    before = model.SerializeToString()
    out, _ = p.execute(model, PassContext(), owned=True)  # even when the caller lets it change ``model``
    assert out is not model and model.SerializeToString() == before


def test_a_result_types_what_callers_read():
    model = parse(SMALL)
    _, result = get_pass("fix_static_shapes").run(model, PassContext())
    assert result.mapping is None and result.io_perms is None and result.max_abs_diff is None
    _, checked = get_pass("fix_static_shapes").run(model, PassContext(check_numerics=True))
    assert set(checked.max_abs_diff) == {o.name for o in model.graph.output}
