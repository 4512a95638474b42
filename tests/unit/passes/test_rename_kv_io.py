import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tpugraph.errors import PassError, UsageError
from tpugraph.passes import PassContext, get_pass
from tpugraph.passes.rename_kv_io import kv_perm

from .conftest import assert_fails_cleanly, assert_same_outputs, ops, parse, shapes_of

SEQ, KVH, D, H = 4, 2, 3, 8
F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64


def block_cache() -> onnx.ModelProto:
    """A decode block in miniature: the history is reduced over its sequence axis (layout sensitive)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("wk", (H, KVH * D)), ("wv", (H, KVH * D)), ("wo", (KVH * D, H)))]
    inits += [numpy_helper.from_array(np.array(v, dtype=np.int64), n)
              for n, v in (("kv_shape", [1, 1, KVH, D]), ("flat", [1, 1, KVH * D]), ("seq_axis", [1]))]
    mk = helper.make_node
    nodes = [
        mk("MatMul", ["input_states", "wk"], ["k"]), mk("Reshape", ["k", "kv_shape"], ["past_k"]),
        mk("MatMul", ["input_states", "wv"], ["v"]), mk("Reshape", ["v", "kv_shape"], ["past_v"]),
        mk("ReduceSum", ["history_k", "seq_axis"], ["hk"]), mk("ReduceMax", ["history_v"], ["hv"], axes=[1]),
        mk("Mul", ["hk", "past_k"], ["score"]), mk("Add", ["score", "hv"], ["mix"]),
        mk("Reshape", ["mix", "flat"], ["mix_flat"]), mk("MatMul", ["mix_flat", "wo"], ["attn"]),
        mk("ReduceMean", ["attention_mask"], ["m"], axes=[3], keepdims=0),
        mk("Cast", ["position_ids"], ["p"], to=F), mk("Add", ["m", "p"], ["mp"]),
        mk("Add", ["input_states", "attn"], ["h0"]), mk("Add", ["h0", "mp"], ["hidden_states"]),
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "block_cache_3",
        [vi("input_states", F, [1, 1, H]), vi("position_ids", I64, [1, 1]), vi("attention_mask", F, [1, 1, 1, SEQ + 1]),
         vi("history_k", F, [1, SEQ, KVH, D]), vi("history_v", F, [1, SEQ, KVH, D])],
        [vi("hidden_states", F, [1, 1, H]), vi("past_k", F, [1, 1, KVH, D]), vi("past_v", F, [1, 1, KVH, D])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_default_convention_changes_nothing():
    model = block_cache()
    out, result = get_pass("rename_kv_io").run(model, PassContext(layer=3))
    assert not result.modified and result.details["renamed"] == 0
    assert result.details["mapping"]["history_k"] == "history_k"
    assert out.SerializeToString() == model.SerializeToString()


def test_optimum_names():
    model = block_cache()
    out, result = get_pass("rename_kv_io", convention="optimum").run(model, PassContext(segment="block_cache_3",
                                                                                       layer=3))
    assert result.modified and result.details["renamed"] == 6
    assert result.details["mapping"] == {
        "input_states": "inputs_embeds", "position_ids": "position_ids", "attention_mask": "attention_mask",
        "history_k": "past_key_values.3.key", "history_v": "past_key_values.3.value",
        "hidden_states": "last_hidden_state", "past_k": "present.3.key", "past_v": "present.3.value"}
    assert list(shapes_of(out)) == ["inputs_embeds", "position_ids", "attention_mask", "past_key_values.3.key",
                                    "past_key_values.3.value", "last_hidden_state", "present.3.key",
                                    "present.3.value"]
    assert shapes_of(out)["past_key_values.3.key"] == (1, SEQ, KVH, D)  # layout kept by default
    assert ops(out) == ops(model)
    assert_same_outputs(model, out)


@pytest.mark.parametrize("convention, layout, k_shape, v_shape, new_k_shape", [
    ("optimum", "head-major", (1, KVH, SEQ, D), (1, KVH, SEQ, D), (1, KVH, 1, D)),
    ("genie", "key-transposed", (1, KVH, D, SEQ), (1, KVH, SEQ, D), (1, KVH, D, 1)),
])
def test_native_layout_of_the_convention(convention, layout, k_shape, v_shape, new_k_shape):
    model = block_cache()
    out, result = get_pass("rename_kv_io", convention=convention, kv_layout="native").run(
        model, PassContext(layer=3))
    names = result.details["mapping"]
    shapes = shapes_of(out)
    assert result.details["kv_layout"] == layout and result.details["transposed"] == 4
    assert shapes[names["history_k"]] == k_shape and shapes[names["history_v"]] == v_shape
    assert shapes[names["past_k"]] == new_k_shape and shapes[names["past_v"]] == (1, KVH, 1, D)
    assert ops(out).count("Transpose") == 4
    assert_same_outputs(model, out, io_perms=result.details["io_perms"])
    for io_name, perm in result.details["io_perms"]["inputs"].items():
        role = "history_k" if io_name == names["history_k"] else "history_v"
        assert tuple(perm) == kv_perm(role, "sequence-major", layout)


def test_round_trip_back_to_the_contract():
    model = block_cache()
    there, _ = get_pass("rename_kv_io", convention="optimum", kv_layout="native").run(model, PassContext(layer=3))
    back, result = get_pass("rename_kv_io", source="optimum", convention="llm-tpu",
                            kv_layout="sequence-major").run(there, PassContext())  # layer read from the names
    assert shapes_of(back) == shapes_of(model)
    assert result.details["mapping"]["past_key_values.3.key"] == "history_k"
    assert_same_outputs(model, back)


def test_internal_tensor_with_the_wanted_name_steps_aside():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    lm_head (float[1, 4] hidden_states) => (float[1, 4] m_logits)
    { logits = Relu(hidden_states)
      m_logits = Neg(logits) }
    """)
    out, result = get_pass("rename_kv_io", convention="optimum").run(model, PassContext(segment="lm_head"))
    assert [o.name for o in out.graph.output] == ["logits"] and out.graph.input[0].name == "last_hidden_state"
    relu = out.graph.node[0]
    assert relu.output[0] != "logits" and out.graph.node[1].input[0] == relu.output[0]
    assert_same_outputs(model, out)


def test_layer_index_is_required_for_per_layer_names():
    model = block_cache()
    assert_fails_cleanly(model, [get_pass("remove_unused"), get_pass("rename_kv_io", convention="optimum")],
                         PassContext(segment="block_cache_x"), "rename_kv_io", "needs the layer index")


def test_layer_in_names_must_match_the_segment():
    there, _ = get_pass("rename_kv_io", convention="genie").run(block_cache(), PassContext(layer=3))
    with pytest.raises(PassError, match="names layer 3 but the segment is layer 4"):
        get_pass("rename_kv_io", source="genie").run(there, PassContext(layer=4))


def test_strict_refuses_unknown_io():
    model = block_cache()
    model.graph.input[0].name = "my_states"
    model.graph.node[0].input[0] = "my_states"
    model.graph.node[2].input[0] = "my_states"
    model.graph.node[13].input[0] = "my_states"
    out, result = get_pass("rename_kv_io").run(model, PassContext(layer=3))
    assert result.details["unmapped"] == ["my_states"]
    with pytest.raises(PassError, match="my_states is not part of the 'llm-tpu' convention"):
        get_pass("rename_kv_io", strict=True).run(model, PassContext(layer=3))


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="conventions: llm-tpu, optimum, genie"):
        get_pass("rename_kv_io", convention="vllm")
    with pytest.raises(UsageError, match="kv_layout"):
        get_pass("rename_kv_io", kv_layout="sideways")
