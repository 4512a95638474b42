"""GPTQ / AWQ GEMM / AutoRound checkpoints: dequantized bit for bit like an independent reading of the
format, exported, and verified against transformers running the independently dequantized checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from quant_checkpoints import TINY_Q, Variant, reference_dequantize, write_quantized, write_reference_model
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify
from tpugraph.source.checkpoint import load_config, open_weights, resolve_model
from tpugraph.source.quantized import QuantizedWeights

VARIANTS = [
    Variant("gptq", 4, 32, sym=True),
    Variant("gptq", 4, 32, sym=False, desc_act=True),
    Variant("gptq", 4, -1, sym=False),
    Variant("gptq", 8, 32, sym=False),
    Variant("gptq", 8, 64, sym=True, desc_act=True),
    Variant("gptq", 4, 16, sym=False, checkpoint_format="gptq_v2"),
    Variant("awq", 4, 32, sym=False, packing="awq"),
    Variant("auto-round", 4, 32, sym=False),
    Variant("auto-round", 4, 32, sym=False, packing="awq"),
    Variant("compressed-tensors", 4, 32, sym=True, packing="ct"),
    Variant("compressed-tensors", 8, -1, sym=True, packing="ct"),
]


def _open(folder):
    source = resolve_model(str(folder))
    config, _ = load_config(source)
    return open_weights(source, config)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_dequantized_bit_for_bit_like_the_reference(tmp_path, variant):
    folder, tensors = write_quantized(tmp_path / "q", variant)
    weights = _open(folder)
    assert isinstance(weights, QuantizedWeights)
    marker = ".weight_packed" if variant.packing == "ct" else ".qweight"
    packed = [k[: -len(marker)] for k in tensors if k.endswith(marker)]
    assert len(packed) == 2 * 7
    for prefix in packed:
        key = f"{prefix}.weight"
        assert key in weights and f"{prefix}{marker}" not in weights
        got = weights.get(key)
        out_f, in_f = weights.shape_and_dtype(key)[0]
        want = reference_dequantize(tensors, prefix, variant, in_f, out_f)
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
        assert np.array_equal(got.numpy(), want), prefix
    # Everything that is not packed is read as stored.
    assert torch.equal(weights.get("model.embed_tokens.weight"),
                       torch.from_numpy(tensors["model.embed_tokens.weight"]))
    q = weights.quantization
    assert (q["bits"], q["group_size"], q["sym"], q["desc_act"]) == (
        variant.bits, variant.group_size, variant.sym if variant.packing != "awq" else False, variant.desc_act)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[1], VARIANTS[3], VARIANTS[4], VARIANTS[6], VARIANTS[7],
                                     VARIANTS[8], VARIANTS[9], VARIANTS[10]], ids=lambda v: v.name)
def test_exports_and_verifies_against_the_independent_dequantization(tmp_path, variant):
    folder, tensors = write_quantized(tmp_path / "q", variant)
    reference = write_reference_model(tmp_path / "ref", folder, tensors, variant)
    out = tmp_path / "out"
    manifest = export_and_optimize(str(folder), out, ExportOptions(seq_length=32, passes=[]))
    recorded = manifest.model.source_quantization
    assert recorded.method == variant.method and recorded.bits == variant.bits
    assert recorded.group_size == variant.group_size and recorded.desc_act == variant.desc_act
    report = verify(out, prompt_length=6, new_tokens=6, model_path=str(reference))
    assert report.passed, (report.hf_tokens, report.onnx_tokens, report.min_cosine)
    assert report.min_cosine > 0.99999


runner = CliRunner()


def _bad(tmp_path, variant, edit_config=None, edit_tensors=None):
    from safetensors.numpy import save_file

    folder, tensors = write_quantized(tmp_path / "q", variant)
    if edit_tensors:
        edit_tensors(tensors)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        raw = json.loads((folder / "config.json").read_text())
        edit_config(raw["quantization_config"])
        (folder / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "out"
    result = runner.invoke(app, ["export-and-optimize", str(folder), "-o", str(out), "--seq-length", "32"])
    errors = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    assert not (out / "manifest.json").exists()
    return errors[0]


def test_bits_disagreeing_with_the_packing_is_refused(tmp_path):
    line = _bad(tmp_path, Variant("gptq", 8, 32, sym=True), edit_config=lambda qc: qc.update(bits=4))
    assert "bits=4" in line and "8-bit" in line and "model.layers.0." in line


def test_act_order_without_g_idx_is_refused(tmp_path):
    def drop_g_idx(tensors):
        for key in [k for k in tensors if k.endswith(".g_idx")]:
            del tensors[key]

    line = _bad(tmp_path, Variant("gptq", 4, 32, sym=False, desc_act=True), edit_tensors=drop_g_idx)
    assert "desc_act" in line and "g_idx" in line


def test_group_size_disagreeing_with_the_scales_is_refused(tmp_path):
    line = _bad(tmp_path, Variant("gptq", 4, 32, sym=True), edit_config=lambda qc: qc.update(group_size=16))
    assert "group_size=16" in line


@pytest.mark.parametrize("edit, needle", [
    (lambda qc: qc.update(bits=3), "bits=3"),
    (lambda qc: qc.update(quant_method="bitsandbytes"), "bitsandbytes"),
    (lambda qc: qc.update(checkpoint_format="marlin"), "marlin"),
])
def test_unsupported_schemes_are_refused(tmp_path, edit, needle):
    assert needle in _bad(tmp_path, Variant("gptq", 4, 32, sym=True), edit_config=edit)


def test_compressed_tensors_bits_disagreeing_with_the_packing_is_refused(tmp_path):
    line = _bad(tmp_path, Variant("compressed-tensors", 8, 32, sym=True, packing="ct"),
                edit_config=lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4))
    assert "num_bits=4" in line and "8-bit" in line


def test_compressed_tensors_asymmetric_is_refused(tmp_path):
    line = _bad(tmp_path, Variant("compressed-tensors", 4, 32, sym=True, packing="ct"),
                edit_config=lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric=False))
    assert "asymmetric" in line


def test_awq_gemv_is_refused(tmp_path):
    line = _bad(tmp_path, Variant("awq", 4, 32, sym=False, packing="awq"), edit_config=lambda qc: qc.update(version="gemv"))
    assert "gemv" in line.lower()


def test_tiny_shape_is_what_the_checkpoints_use():
    # The packing needs in/out features divisible by 32/bits and by the group sizes above.
    assert TINY_Q["hidden_size"] % 64 == 0 and TINY_Q["intermediate_size"] % 64 == 0
