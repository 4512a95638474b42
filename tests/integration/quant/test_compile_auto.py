"""compile --quantize auto: the plan takes the weight-only mode, group size and symmetry quant_fidelity chose for a
quantized source, and the usual float mode for a float source."""

from __future__ import annotations

from quant_checkpoints import Variant, write_quantized

from tpugraph.compiler import CompileOptions, plan_compile
from tpugraph.export.pipeline import ExportOptions, export_and_optimize


def _deploy_flags(plan, segment: str) -> tuple[str, ...]:
    return next(s.argv for s in plan.steps if s.segment == segment and s.action == "deploy")


def _export(tmp_path, variant):
    folder, _ = write_quantized(tmp_path / variant.name, variant)
    out = tmp_path / f"out-{variant.name}"
    export_and_optimize(str(folder), out, ExportOptions(seq_length=16, passes=[]))
    return out


def test_auto_takes_the_asymmetric_group_of_an_awq_checkpoint(tmp_path):
    plan = plan_compile(_export(tmp_path, Variant("awq", 4, 32, sym=False, packing="awq")), CompileOptions())
    assert plan.options.quantize == "w4f16" and plan.options.q_group_size == 32 and not plan.options.q_symmetric
    assert plan.quant_choice is not None and plan.quant_choice.method == "awq"
    flags = _deploy_flags(plan, "block_0")
    assert "W4F16" in flags and flags[flags.index("--q_group_size") + 1] == "32" and "--q_symmetric" not in flags
    assert "--quantize auto" in plan.command
    # the heads and the embedding keep their float types
    assert "--q_group_size" not in _deploy_flags(plan, "embedding")


def test_auto_passes_q_symmetric_where_it_fits_better(tmp_path):
    plan = plan_compile(_export(tmp_path, Variant("gptq", 8, 32, sym=True)), CompileOptions())
    assert plan.quant_choice.q_symmetric and plan.options.q_symmetric
    assert plan.options.quantize == "w8f16" and "--q_symmetric" in _deploy_flags(plan, "block_cache_0")
    assert "--q_symmetric" not in _deploy_flags(plan, "embedding")


def test_an_explicit_mode_is_kept_and_a_float_source_gets_f16(tmp_path, make_model):
    out = _export(tmp_path, Variant("gptq", 4, 32, sym=False))
    explicit = plan_compile(out, CompileOptions(quantize="bf16"))
    assert explicit.options.quantize == "bf16" and explicit.quant_choice is None
    float_out = tmp_path / "float-out"
    export_and_optimize(str(make_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)),
                        float_out, ExportOptions(seq_length=16, passes=[]))
    plan = plan_compile(float_out, CompileOptions())
    assert plan.options.quantize == "f16" and plan.quant_choice is None
