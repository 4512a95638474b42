"""Weight swapping: one optimised layer graph reused for every layer of the same structure, and shared
external data, must give exactly what exporting each layer on its own gives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import TINY_LLAMA, build_model_dir
from onnx import helper, numpy_helper

from tpugraph.contract.manifest import read_manifest, validate
from tpugraph.export import weight_swap
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

SEQ = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("m"), "llama", seed=11, **dict(TINY_LLAMA, num_hidden_layers=4))


def _onnx_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.onnx"))}


@pytest.mark.parametrize("set_aside", [None, 4096], ids=["weights-inline", "weights-set-aside"])
def test_swapped_layers_equal_layers_exported_one_by_one(model_dir, tmp_path, monkeypatch, set_aside):
    if set_aside:  # the big-model path: weights set aside from the graph while the chain runs
        from tpugraph.export import factory

        monkeypatch.setattr(factory, "HIDE_MIN_BYTES", set_aside)
    swapped, single = tmp_path / "swapped", tmp_path / "single"
    m1 = export_and_optimize(str(model_dir), swapped, ExportOptions(seq_length=SEQ))
    m2 = export_and_optimize(str(model_dir), single, ExportOptions(seq_length=SEQ, weight_swap=False))
    assert m1.stats.segments_weight_swapped == 2 * 3  # layers 1..3, block and block_cache
    assert m2.stats.segments_weight_swapped == 0
    assert _onnx_bytes(swapped) == _onnx_bytes(single)
    entry = read_manifest(swapped).segment("block_cache_3")
    assert entry.graph_reused_from == "block_cache_0"
    assert [r["name"] for r in entry.passes] == [p.name for p in m1.pass_chain]
    assert verify(swapped, prompt_length=6, new_tokens=6).passed


def test_block_and_block_cache_share_one_external_data_file(model_dir, tmp_path):
    out = tmp_path / "ext"
    export_and_optimize(str(model_dir), out, ExportOptions(seq_length=SEQ, external_data="always"))
    manifest = read_manifest(out)
    for layer in range(4):
        b, bc = manifest.segment(f"block_{layer}"), manifest.segment(f"block_cache_{layer}")
        assert [e.file for e in b.external_data] == [e.file for e in bc.external_data] == [f"layer_{layer}.data"]
    vocab = {e.file for n in ("embedding", "embedding_cache", "lm_head") for e in manifest.segment(n).external_data}
    assert vocab == {"vocab.data"}
    # Each layer's weights are on disk once: the data file is the size of the layer's fp32 parameters.
    cfg = TINY_LLAMA
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    d = h // cfg["num_attention_heads"]
    layer_params = 2 * h * h + 2 * h * kv * d + 3 * h * i + 2 * h
    size = (out / "layer_2.data").stat().st_size
    assert layer_params * 4 <= size < layer_params * 4 * 1.1
    # The embedding matrix is stored once for embedding and embedding_cache (3 copies without sharing;
    # this model's lm_head is untied, so its matrix is the second one).
    matrix = cfg["vocab_size"] * h * 4
    assert 2 * matrix <= (out / "vocab.data").stat().st_size < 2.1 * matrix
    assert validate(out) == []
    assert verify(out, prompt_length=5, new_tokens=5).passed


def test_external_and_inline_outputs_compute_the_same(model_dir, tmp_path):
    import onnxruntime as ort

    inline, ext = tmp_path / "inline", tmp_path / "ext"
    export_and_optimize(str(model_dir), inline, ExportOptions(seq_length=SEQ, external_data="never"))
    export_and_optimize(str(model_dir), ext, ExportOptions(seq_length=SEQ, external_data="always"))
    rng = np.random.default_rng(0)
    feeds = {"input_states": rng.standard_normal((1, 1, TINY_LLAMA["hidden_size"]), dtype=np.float32),
             "position_ids": np.array([[3]], dtype=np.int32),
             "attention_mask": np.zeros((1, 1, 1, SEQ + 1), dtype=np.float32),
             "history_k": rng.standard_normal((1, SEQ, 2, 12), dtype=np.float32),
             "history_v": rng.standard_normal((1, SEQ, 2, 12), dtype=np.float32)}
    a = ort.InferenceSession(str(inline / "block_cache_2.onnx")).run(None, feeds)
    b = ort.InferenceSession(str(ext / "block_cache_2.onnx")).run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _matmul_graph(weight: np.ndarray, bias: np.ndarray, transposed: bool) -> onnx.ModelProto:
    w = weight.T.copy() if transposed else weight
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, w.shape[1]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def test_discover_sources_finds_transposed_and_plain_parameters():
    rng = np.random.default_rng(1)
    probe = {"proj.weight": rng.standard_normal((6, 4), dtype=np.float32),
             "proj.bias": rng.standard_normal(6, dtype=np.float32)}
    model = _matmul_graph(probe["proj.weight"], probe["proj.bias"], transposed=True)
    sources = weight_swap.discover_sources(model, probe)
    assert {(s.initializer, s.param, s.transform) for s in sources} == {
        ("w", "proj.weight", weight_swap.TRANSPOSE), ("b", "proj.bias", weight_swap.IDENTITY)}
    template = weight_swap.make_template(model, sources)
    real = {"proj.weight": rng.standard_normal((6, 4), dtype=np.float32),
            "proj.bias": rng.standard_normal(6, dtype=np.float32)}
    expected = _matmul_graph(real["proj.weight"], real["proj.bias"], transposed=True)
    assert weight_swap.reproduces(template, template.fill(real), expected)
    assert not weight_swap.reproduces(template, template.fill(real),
                                      _matmul_graph(real["proj.weight"], real["proj.bias"] + 1, transposed=True))
    filled, weights = weight_swap.apply(template, template.fill(real))
    assert weights == []
    assert filled.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


def test_discover_sources_refuses_a_parameter_the_graph_transformed():
    rng = np.random.default_rng(2)
    probe = {"norm.weight": rng.standard_normal(4, dtype=np.float32), "proj.weight": rng.standard_normal((4, 4), dtype=np.float32)}
    # Gemma-style (1 + w) folded into the initializer: no byte-equal parameter exists.
    model = _matmul_graph(probe["proj.weight"], probe["norm.weight"] + 1.0, transposed=False)
    with pytest.raises(ValueError, match="norm.weight"):
        weight_swap.discover_sources(model, probe)


@pytest.mark.parametrize("external", ["never", "always"])
def test_weights_set_aside_during_the_chain_give_a_correct_export(model_dir, tmp_path, monkeypatch, external):
    """Big-model paths on a tiny model: every weight of 4 KB or more sits out the chain (vocabulary segments
    traced with parameters as inputs, layers hidden after tracing), then returns inline or as external data."""
    from tpugraph.export import factory

    monkeypatch.setattr(factory, "HIDE_MIN_BYTES", 4096)
    out = tmp_path / "o"
    manifest = export_and_optimize(str(model_dir), out, ExportOptions(seq_length=SEQ, external_data=external))
    assert manifest.stats.segments_weight_swapped == 6
    lm_head = onnx.load(str(out / "lm_head.onnx"), load_external_data=False)
    assert [n.op_type for n in lm_head.graph.node][-1] == "Gemm"
    for name in ("embedding", "block_2", "block_cache_3", "lm_head"):
        graph = onnx.load(str(out / f"{name}.onnx")).graph
        inits = {t.name for t in graph.initializer}
        # Set-aside weights are initializers again, not graph inputs.
        assert [v.name for v in graph.input if v.name not in inits] == [t.name for t in read_manifest(out).segment(name).inputs]
    assert validate(out) == []
    assert verify(out, prompt_length=6, new_tokens=6).passed


def test_tied_embedding_and_lm_head_are_stored_once(tmp_path):
    cfg = dict(TINY_LLAMA, tie_word_embeddings=True)
    model = build_model_dir(tmp_path / "m", "llama", seed=3, **cfg)
    out = tmp_path / "o"
    export_and_optimize(str(model), out, ExportOptions(seq_length=SEQ, external_data="always"))
    matrix = cfg["vocab_size"] * cfg["hidden_size"] * 4
    # embedding, embedding_cache and the tied lm_head (a Gemm on the matrix as stored) share one copy.
    assert matrix <= (out / "vocab.data").stat().st_size < 1.1 * matrix
    assert verify(out, prompt_length=5, new_tokens=5).passed
