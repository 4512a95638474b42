"""--lora-max-rank on the cmodel: one BF16 bmodel whose block nets take LoRA inputs gives the base model's tokens with
zeros and transformers + PEFT's tokens with an adapter's A and B (docs/guides/lora.md). Tiny Llama, SEQ 16."""

from __future__ import annotations

from conftest import TINY_LLAMA, build_model_dir
from lora_adapters import make_adapter

from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify

SEQ = 16


def test_bmodel_with_lora_inputs_serves_base_and_adapter(tmp_path, toolchain):
    base = build_model_dir(tmp_path / "base", "llama", seed=7, **dict(TINY_LLAMA, num_hidden_layers=1))
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=("q_proj", "v_proj", "down_proj"))
    out = tmp_path / "out"
    export_and_optimize(str(base), out, ExportOptions(seq_length=SEQ, lora_max_rank=8))
    bmodel = compile_segments(out, toolchain, CompileOptions(quantize="bf16", check="none"), jobs=2).bmodel

    plain = verify(out, prompt_length=5, new_tokens=6, seed=3, bmodel=bmodel, tpu_mlir=toolchain, mask_check=False)
    assert plain.passed and plain.tokens_equal, (plain.hf_tokens, plain.onnx_tokens)  # zeros: the base model
    adapted = verify(out, prompt_length=5, new_tokens=6, seed=3, bmodel=bmodel, tpu_mlir=toolchain, mask_check=False,
                     lora=adapter)
    assert adapted.passed and adapted.tokens_equal, (adapted.hf_tokens, adapted.onnx_tokens)  # transformers + PEFT
    assert adapted.onnx_tokens != plain.onnx_tokens  # the same bmodel, another model: the inputs carry the adapter
