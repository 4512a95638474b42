"""quant_fidelity: tpu-mlir's per-group re-quantization simulated exactly, and the compile mode chosen for
each kind of checkpoint with its measured fidelity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf_files import write_gguf
from quant_checkpoints import Variant, write_quantized

from tpugraph.compiler.quant_fidelity import choose_compile_mode, measure_source, tpu_mlir_requantize
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.source.checkpoint import load_config, open_weights, resolve_model


def c_like_requantize(w, bits, group, symmetric):
    """tpu-mlir's computePerGroupParam + weightQuantization, one group at a time in plain Python floats
    (float32 through numpy scalars), dequantized with an f16 scale."""
    out = np.empty_like(w)
    max_int = 2 ** bits - 1
    flat, res = w.reshape(-1), out.reshape(-1)
    for start in range(0, flat.size, group):
        block = flat[start:start + group]
        if symmetric:
            scale = np.float32(2) * np.float32(np.abs(block).max()) / np.float32(max_int)
            zp = 8 if bits == 4 else 128
        else:
            scale = np.float32(max(np.float32(block.max() - block.min()), np.float32(1e-5))) / np.float32(max_int)
            r = block.min() / scale
            zp = min(max(-math.copysign(math.floor(abs(r) + 0.5), r), 0), max_int)
        for i, x in enumerate(block):
            r = x / scale
            q = math.copysign(math.floor(abs(r) + 0.5), r) + zp
            q = min(max(q, 0), max_int)
            res[start + i] = np.float32(q - zp) * np.float32(np.float16(scale))
    return out


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, False), (4, 32, True), (8, 16, False), (8, 64, True)])
def test_requantization_matches_the_compiler_formula(bits, group, symmetric):
    w = np.random.default_rng(bits + group).normal(0, 0.05, (8, 64)).astype(np.float32)
    assert np.array_equal(tpu_mlir_requantize(w, bits, group, symmetric), c_like_requantize(w, bits, group, symmetric))


def _choice(tmp_path, variant):
    folder, _ = write_quantized(tmp_path / variant.name, variant)
    source = resolve_model(str(folder))
    config, family = load_config(source)
    weights = open_weights(source, config)
    return measure_source(weights, weights.quantization, family.layers_path, sample_layers=None)


def test_awq_asymmetric_same_group_survives(tmp_path):
    choice = _choice(tmp_path, Variant("awq", 4, 32, sym=False, packing="awq"))
    assert choice.quantize == "w4f16" and choice.q_group_size == 32 and not choice.q_symmetric
    assert choice.asymmetric.exact_share > 0.99 and choice.asymmetric.extra_error_ratio < 0.1
    assert choice.symmetric.exact_share < 0.01


def test_gptq_act_order_does_not_line_up(tmp_path):
    choice = _choice(tmp_path, Variant("gptq", 4, 32, sym=False, desc_act=True))
    assert choice.chosen.exact_share < 0.05 and choice.chosen.extra_error_ratio > 0.5
    assert any("act-order" in n for n in choice.notes)


def test_gptq_8bit_picks_w8_and_per_channel_for_group_minus_one(tmp_path):
    choice = _choice(tmp_path, Variant("gptq", 8, -1, sym=False))
    assert choice.quantize == "w8f16" and choice.q_group_size == 0
    assert choice.compile_args() == ["--quantize", "w8f16"]
    assert choice.asymmetric.exact_share > 0.9


def test_gguf_q4_1_offset_grid_costs_its_own_error_again(tmp_path):
    path = tmp_path / "q41.gguf"
    write_gguf(path, default="Q4_1")
    out = tmp_path / "out"
    export_and_optimize(str(path), out, ExportOptions(seq_length=16, passes=[]))
    choice = choose_compile_mode(out, sample_layers=None)
    assert choice.method == "gguf" and choice.quantize == "w4f16" and choice.q_group_size == 32
    # Q4_1's per-block minimum is not a whole number of steps: the grid shifts by a uniform fraction of a step.
    assert choice.asymmetric.exact_share < 0.05
    assert 0.9 < choice.asymmetric.extra_error_ratio < 1.1


def test_plain_source_has_no_choice(tmp_path, make_model):
    out = tmp_path / "out"
    export_and_optimize(str(make_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)),
                        out, ExportOptions(seq_length=16, passes=[]))
    assert choose_compile_mode(out) is None


def test_cli_prints_the_choice(tmp_path):
    import json

    from typer.testing import CliRunner

    from tpugraph.cli import app

    folder, _ = write_quantized(tmp_path / "q", Variant("gptq", 8, 32, sym=False))
    out = tmp_path / "out"
    export_and_optimize(str(folder), out, ExportOptions(seq_length=16, passes=[]))
    result = CliRunner().invoke(app, ["quant-fidelity", str(out), "--layers", "0", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["quantize"] == "w8f16" and data["q_group_size"] == 32 and not data["q_symmetric"]
    assert data["asymmetric"]["exact_share"] > 0.9 and "reproduce" in data["summary"]
    result = CliRunner().invoke(app, ["quant-fidelity", str(out), "--half", "f32"])
    assert result.exit_code == 2 and "--half" in result.output
