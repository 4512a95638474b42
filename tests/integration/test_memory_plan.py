"""The memory plan: a Qwen2.5-7B-shaped model (config only, meta device) split over 1, 2, 4 bm1684x devices as
llm_convert's --num_device splits it, checked against numbers derived by hand; compile --dry-run and the refusal."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.compiler.chips import CHIP_TABLE, GIB
from tpugraph.compiler.memory_plan import WEIGHT_LIMIT, ModelShape, check_fits, plan_memory
from tpugraph.errors import UsageError
from tpugraph.export.pipeline import ExportOptions, export_and_optimize

# Qwen2.5-7B's config.json (the shapes only)
H, I, LAYERS, HEADS, KV, D, V = 3584, 18944, 28, 28, 4, 128, 152064
SEQ = 512


@pytest.fixture(scope="module")
def qwen7b() -> ModelShape:
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV, vocab_size=V, max_position_embeddings=32768,
                         tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])
    return ModelShape.from_config(config)


def expected_bf16(n: int) -> dict[str, int]:
    """Per-device bytes by hand, BF16 (2 bytes an element), N devices as tpu-mlir's device-parallel pass splits
    llm_convert's nets: attention by heads (q/o: ceil(28/N) of 28 heads of 128, k/v and their biases: ceil(4/N) of
    4 KV heads), the MLP by columns (gate/up rows and down columns: ceil(I/N)), the two RMSNorm weights whole;
    lm_head by vocabulary rows (ceil(V/N)) plus the final norm whole; the embedding whole on every device."""
    q = math.ceil(HEADS / n) * D  # this device's query width
    kv = math.ceil(KV / n) * D  # its key (and value) width
    inter = math.ceil(I / n)
    per_layer = (H * q + q  # q_proj weight + bias
                 + 2 * (H * kv + kv)  # k_proj, v_proj weights + biases
                 + q * H  # o_proj (its input columns)
                 + 3 * H * inter  # gate, up, down
                 + 2 * H)  # input_layernorm, post_attention_layernorm
    return {
        "embedding": 2 * V * H,
        "blocks": 2 * LAYERS * per_layer,
        "lm_head": 2 * (math.ceil(V / n) * H + H),
        # SEQ x layers x kv heads x head dim x 2 (K, V) x 2 bytes
        "kv_cache": SEQ * LAYERS * math.ceil(KV / n) * D * 2 * 2,
    }


@pytest.mark.parametrize("n", [1, 2, 4])
def test_7b_split_matches_llm_convert(qwen7b, n):
    plan = plan_memory(qwen7b, "bm1684x", "bf16", n, SEQ)
    want = expected_bf16(n)
    assert plan.weights["embedding"] == want["embedding"]
    assert plan.weights["blocks"] == want["blocks"]
    assert plan.weights["lm_head"] == want["lm_head"]
    assert plan.kv_cache == want["kv_cache"]
    assert plan.total == plan.weight_bytes + plan.kv_cache + plan.activations and plan.activations > 0
    if n > 1:  # every layer's attention and MLP, and lm_head, are big enough to split
        assert len(plan.split) == 2 * LAYERS + 1 and not plan.whole
    # 7.6 billion weights in BF16: about 14.2 GiB on one device, under 16 GiB; halved blocks with two
    assert plan.fits
    assert (plan.weights["blocks"] < 0.51 * plan_memory(qwen7b, "bm1684x", "bf16", 1, SEQ).weights["blocks"]) == (n > 1)


def test_7b_w4_and_refusal(qwen7b):
    w4 = plan_memory(qwen7b, "bm1684x", "w4bf16", 1, SEQ, q_group_size=64)
    # a [rows, cols] matmul in W4, group 64, asymmetric: rows*cols/2 bytes + rows*cols/64 groups * (2 + 1)
    matmuls = LAYERS * (H * HEADS * D + 2 * H * KV * D + HEADS * D * H + 3 * H * I)
    norms_biases = LAYERS * (HEADS * D + 2 * KV * D + 2 * H) * 2
    assert w4.weights["blocks"] == matmuls // 2 + matmuls // 64 * 3 + norms_biases
    assert w4.weights["lm_head"] == V * H // 2 + V * H // 64 * 3 + 2 * H
    # a 4 GiB board cannot hold it; the refusal carries the numbers and the way out
    small = plan_memory(qwen7b, "bm1684x", "w4bf16", 1, SEQ, q_group_size=64, memory_bytes=4 * GIB)
    assert not small.fits
    with pytest.raises(UsageError, match=r"does not fit bm1684x: \d+\.\d\d GiB on the device .* of 4\.00 GiB"):
        check_fits(small)
    # on cv186x's memory neither does the BF16 model
    assert not plan_memory(qwen7b, "cv186x", "bf16", 1, SEQ).fits


def test_small_nets_stay_whole(qwen7b):
    """A net whose largest matmul has at most WEIGHT_LIMIT elements is copied whole to every device."""
    from transformers import LlamaConfig

    tiny = ModelShape.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                              architectures=["LlamaForCausalLM"]))
    one, two = plan_memory(tiny, "bm1684x", "f16", 1, 64), plan_memory(tiny, "bm1684x", "f16", 2, 64)
    assert max(w.elements for w in tiny.weights) <= WEIGHT_LIMIT
    assert two.split == [] and len(two.whole) == 5  # 2 layers x (attention, mlp) + lm_head
    assert two.weights["blocks"] == one.weights["blocks"] and two.kv_cache == one.kv_cache


def test_dry_run_and_chip_table(tmp_path):
    out = tmp_path / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=16))
    runner = CliRunner()
    result = runner.invoke(app, ["compile", str(out), "--chip", "cv186x", "--quantize", "bf16", "--dry-run",
                                 "--tpu-mlir", str(tmp_path / "no-venv")])
    assert result.exit_code == 0, result.output
    assert "memory plan: bf16 on cv186x, SEQ 16, 1 device" in result.output
    for label in ("weights embedding", "weights blocks", "KV cache", "activations (est.)", "total"):
        assert label in result.output
    assert "device memory 4.00 GiB: fits" in result.output
    assert not (out / "compile").exists()  # nothing ran, no script written
    # a board too small: the same numbers, refused (one line, exit 2)
    result = runner.invoke(app, ["compile", str(out), "--chip", "bm1688", "--quantize", "f16", "--dry-run",
                                 "--device-memory", "0.00001", "--json"])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["memory"]["fits"] is False and data["memory"]["memory_bytes"] == int(0.00001 * GIB)
    result = runner.invoke(app, ["compile", str(out), "--chip", "bm1688", "--device-memory", "0.00001"])
    assert result.exit_code == 2 and "does not fit bm1688" in result.output and "--device-memory" in result.output
    # a chip tpu-mlir does not know: one line, exit 2
    result = runner.invoke(app, ["compile", str(out), "--chip", "bm9999", "--dry-run"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "--chip: chip must be one of bm1684x, bm1688, cv186x" in result.output
    assert CHIP_TABLE["cv186x"].cores == 1 and CHIP_TABLE["bm1688"].cores == 2
