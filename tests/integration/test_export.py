"""Export of tiny Llama-family models: the contract's segments, a valid manifest, and end-to-end parity."""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import TINY_LLAMA

from tpugraph.contract.manifest import read_manifest, validate
from tpugraph.contract.segments import ContractDims, segment_specs
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

SEQ = 32

VARIANTS = {
    "gqa-untied": dict(TINY_LLAMA),
    "gqa-tied": dict(TINY_LLAMA, tie_word_embeddings=True),
    "explicit-head-dim": dict(TINY_LLAMA, head_dim=20),
    "mqa-odd-sizes": dict(TINY_LLAMA, hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                          intermediate_size=72, vocab_size=301, num_hidden_layers=3),
    "mha-llama3-rope": dict(TINY_LLAMA, num_key_value_heads=4, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
}


def _graph_io(path):
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}

    def desc(v):
        tt = v.type.tensor_type
        return (v.name, tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim),
                onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name)

    return model, [desc(v) for v in model.graph.input if v.name not in inits], [desc(v) for v in model.graph.output]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each variant exported once for this module: name -> (model dir, out dir, config dict)."""
    from conftest import build_model_dir

    done = {}
    for name, cfg in VARIANTS.items():
        model_dir = build_model_dir(tmp_path_factory.mktemp(name), "llama", seed=7, **cfg)
        out = tmp_path_factory.mktemp(f"{name}-out") / "out"
        export_and_optimize(str(model_dir), out, ExportOptions(seq_length=SEQ))
        done[name] = (model_dir, out, cfg)
    return done


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_verify_token_for_token(exported, variant):
    _, out, _ = exported[variant]
    report = verify(out, prompt_length=7, new_tokens=10, seed=3)
    assert report.tokens_equal, (report.hf_tokens, report.onnx_tokens)
    assert len(report.onnx_tokens) == 10
    assert report.min_cosine > 0.99999
    assert report.max_rel_diff < 1e-4
    assert report.passed


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_segments_follow_the_contract(exported, variant):
    _, out, cfg = exported[variant]
    heads = cfg["num_attention_heads"]
    dims = ContractDims(seq=SEQ, hidden=cfg["hidden_size"], kv_heads=cfg["num_key_value_heads"],
                        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                        layers=cfg["num_hidden_layers"])
    specs = segment_specs(dims)
    manifest = read_manifest(out)
    assert [s.name for s in manifest.segments] == [s.name for s in specs]
    for spec in specs:
        model, ins, outs = _graph_io(out / spec.filename)
        assert ins == [(t.name, t.shape, t.dtype) for t in spec.inputs], spec.name
        assert outs == [(t.name, t.shape, t.dtype) for t in spec.outputs], spec.name
        # No symbolic dim anywhere: inputs, outputs and every annotated intermediate value.
        for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
            for d in vi.type.tensor_type.shape.dim:
                assert not d.HasField("dim_param"), f"{spec.name}: {vi.name} has dim_param {d.dim_param}"
                assert d.dim_value > 0, f"{spec.name}: {vi.name} has an unknown dim"


def test_block_kv_layout_is_sequence_major(exported):
    _, out, cfg = exported["explicit-head-dim"]
    _, _, outs = _graph_io(out / "block_0.onnx")
    assert outs[1] == ("past_k", (1, SEQ, cfg["num_key_value_heads"], 20), "float32")
    _, ins, outs = _graph_io(out / "block_cache_1.onnx")
    assert ins[3] == ("history_k", (1, SEQ, cfg["num_key_value_heads"], 20), "float32")
    assert ins[2] == ("attention_mask", (1, 1, 1, SEQ + 1), "float32")
    assert outs[2] == ("past_v", (1, 1, cfg["num_key_value_heads"], 20), "float32")


def test_manifest_describes_model_tools_and_segments(exported):
    model_dir, out, cfg = exported["gqa-tied"]
    data = json.loads((out / "manifest.json").read_text())
    assert data["format"] == "tpugraph-manifest" and data["format_version"] == 1 and data["complete"] is True
    m = data["model"]
    assert (m["architecture"], m["num_layers"], m["hidden_size"], m["num_kv_heads"], m["vocab_size"]) == (
        "LlamaForCausalLM", 2, 48, 2, 320)
    assert m["tie_word_embeddings"] is True
    assert m["source"]["path"] == str(model_dir.resolve()) and m["source"]["random_weights"] is False
    assert {"tpugraph", "torch", "transformers", "onnx", "onnxsim"} <= set(data["tools"])
    assert data["conventions"]["kv_layout"].startswith("sequence-major")
    assert data["conventions"]["mask_value"] == -10000.0
    assert data["options"]["seq_length"] == SEQ
    seg = data["segments"][2]
    assert seg["name"] == "block_0" and seg["kind"] == "block" and seg["layer"] == 0
    assert seg["size"] == (out / "block_0.onnx").stat().st_size and len(seg["sha256"]) == 64
    assert [i["name"] for i in seg["inputs"]] == ["input_states", "position_ids", "attention_mask"]
    assert isinstance(seg["passes"], list)
    assert validate(out) == []


def test_validate_reports_every_mismatch(exported, tmp_path):
    import shutil

    _, out, _ = exported["gqa-untied"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "lm_head.onnx").write_bytes((copy / "lm_head.onnx").read_bytes() + b"x")
    (copy / "greedy_head.onnx").unlink()
    data = json.loads((copy / "manifest.json").read_text())
    data["segments"][0]["inputs"][0]["shape"] = [1, SEQ + 1]
    (copy / "manifest.json").write_text(json.dumps(data))
    problems = validate(copy)
    text = "\n".join(problems)
    assert "lm_head: size" in text and "lm_head: sha256" in text
    assert "greedy_head: file greedy_head.onnx is missing" in text
    assert "embedding: inputs in the file" in text


def test_building_a_skeleton_leaves_other_threads_parameters_real():
    """--jobs: one thread builds a meta skeleton while another materialises a module's real weights."""
    import threading

    import torch

    from tpugraph.export.exporter import _parameters_on_meta

    made = {}
    with _parameters_on_meta():
        assert torch.nn.Linear(2, 2).weight.device.type == "meta"
        t = threading.Thread(target=lambda: made.setdefault("linear", torch.nn.Linear(2, 2)))
        t.start()
        t.join()
    assert made["linear"].weight.device.type == "cpu"
