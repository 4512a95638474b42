"""vocab_sharing: a tied vocabulary matrix stored once in the combined bmodel. The rewritten nets the compile hands
tpu-mlir (the final norm at the end of the last layer, lm_head the bare matrix product) compute what OUT's nets
compute, chained as the runtime chains them; untied models, --embedding-disk and multi-device compiles keep the
contract's cut."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tpugraph.compiler.options import CompileOptions
from tpugraph.compiler.plan import plan_compile
from tpugraph.compiler.vocab_sharing import plan_sharing, rewritten_file, write_shared
from tpugraph.contract.manifest import read_manifest
from tpugraph.export.pipeline import ExportOptions, export_and_optimize

SEQ = 16
WORK = "compile/test"


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    from conftest import TINY_LLAMA, build_model_dir

    root = tmp_path_factory.mktemp("vocab-tied")
    model = build_model_dir(root / "model", "llama", tie_word_embeddings=True, **TINY_LLAMA)
    out = root / "out"
    export_and_optimize(str(model), out, ExportOptions(seq_length=SEQ, max_input_length=8, history_kv=True))
    return out


def _run(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(path, rng):
    feeds = {}
    for value in onnx.load(str(path), load_external_data=False).graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
            dtype = np.int32 if value.type.tensor_type.elem_type == onnx.TensorProto.INT32 else np.int64
            feeds[value.name] = np.zeros(shape, dtype)  # position 0 everywhere: any rotary angle works
        elif "mask" in value.name:
            feeds[value.name] = np.zeros(shape, np.float32)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def test_a_tied_model_moves_the_final_norm_into_every_net_of_its_last_layer(tied, tmp_path):
    manifest = read_manifest(tied)
    sharing, why = plan_sharing(tied, manifest, num_device=1)
    assert sharing is not None, why
    assert sharing.lm_head == "lm_head"
    assert set(sharing.last_layer) == {"block_1", "block_kv_1", "block_cache_1"}
    write_shared(tied, manifest, sharing, WORK)
    rng = np.random.default_rng(0)
    lm_old, lm_new = tied / "lm_head.onnx", tied / rewritten_file(WORK, "lm_head")
    for block in sharing.last_layer:
        old, new = tied / f"{block}.onnx", tied / rewritten_file(WORK, block)
        feeds = _feeds(old, rng)
        ref, got = _run(old, feeds), _run(new, feeds)
        for a, b in zip(ref[1:], got[1:]):  # K and V: untouched
            np.testing.assert_array_equal(a, b)
        last = ref[0][0, -1:]  # the last position's hidden state, as the runtime hands it to lm_head
        logits = _run(lm_old, {"hidden_states": last})[0]
        chained = _run(lm_new, {"hidden_states": got[0][0, -1:]})[0]
        assert chained.shape == logits.shape == (1, 320)
        np.testing.assert_allclose(chained, logits, rtol=1e-4, atol=1e-4)
        assert not np.allclose(got[0], ref[0])  # the block's output is now the normed state
    # lm_head's only weight is the embedding's matrix, stored [V, H] as the embedding's Gather reads it
    head = onnx.load(str(lm_new))
    assert [t.name for t in head.graph.initializer if len(t.dims) == 2] == [sharing.table]
    assert [n.op_type for n in head.graph.node] == ["Transpose", "MatMul", "Reshape"]


def test_the_plan_compiles_the_rewritten_nets_with_the_float_type(tied):
    plan = plan_compile(tied, CompileOptions(quantize="w4bf16", check="none"))
    assert plan.vocab_sharing is not None
    by = {(s.segment, s.action): s for s in plan.steps}
    assert any(a.endswith(rewritten_file(plan.work_dir, "lm_head")) for a in by["lm_head", "transform"].argv)
    assert any(a.endswith(rewritten_file(plan.work_dir, "block_cache_1")) for a in by["block_cache_1", "transform"].argv)
    assert not by["block_1", "transform"].reuse_from  # a structure of its own now
    assert by["block_0", "transform"].argv[-1] == "block_0.mlir" and by["block_0", "transform"].reuse_from == ""
    deploy = by["lm_head", "deploy"].argv
    assert deploy[deploy.index("--quantize") + 1] == "BF16"  # the embedding's type, so the coefficients match
    kept = plan_compile(tied, CompileOptions(quantize="w4bf16", check="none", share_vocab=False))
    assert kept.vocab_sharing is None and "--no-share-vocab" in kept.command
    head = {(s.segment, s.action): s for s in kept.steps}["lm_head", "deploy"].argv
    assert head[head.index("--quantize") + 1] == "W4BF16"


def test_untied_models_disk_embeddings_and_device_splits_keep_the_contracts_cut(tmp_path):
    from conftest import TINY_LLAMA, build_model_dir

    model = build_model_dir(tmp_path / "model", "llama", tie_word_embeddings=False, **TINY_LLAMA)
    out = tmp_path / "out"
    export_and_optimize(str(model), out, ExportOptions(seq_length=SEQ))
    sharing, why = plan_sharing(out, read_manifest(out), num_device=1)
    assert sharing is None and "not tied" in why
    sharing, why = plan_sharing(out, read_manifest(out), num_device=2)
    assert sharing is None and "multi-device" in why
    disk = tmp_path / "disk"
    tied_model = build_model_dir(tmp_path / "tied", "llama", tie_word_embeddings=True, **TINY_LLAMA)
    export_and_optimize(str(tied_model), disk, ExportOptions(seq_length=SEQ, embedding_disk=True))
    sharing, why = plan_sharing(disk, read_manifest(disk), num_device=1)
    assert sharing is None and "no embedding net" in why
