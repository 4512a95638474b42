"""LoRA adapters (docs/guides/lora.md): merged into the export (--lora), checked against transformers + PEFT;
the refusals of what the merge would not reproduce."""

from __future__ import annotations

import json

import pytest
import torch
from cli_harness import one_line, run
from conftest import TINY_LLAMA, build_model_dir
from lora_adapters import make_adapter

from tpugraph.contract.manifest import read_manifest
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import hf_greedy, verify
from tpugraph.source.lora import read_adapter
from tpugraph.source.weights import WeightStore

SEQ = 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("lora-base"), "llama", seed=7, **TINY_LLAMA)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return make_adapter(base, tmp_path_factory.mktemp("adapter") / "adapter", target_modules=TARGETS)


def _peft_merged(base, adapter_dir) -> dict[str, torch.Tensor]:
    """PEFT's own merge (merge_and_unload) of the adapter: the weights our merge must equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().state_dict()


@pytest.mark.parametrize("variant", [dict(), dict(use_rslora=True), dict(rank_pattern={"v_proj": 2}),
                                     dict(modules_to_save=["lm_head"])])
def test_merge_equals_peft_merge(base, tmp_path, variant):
    """W + scale * B @ A (alpha/r, rsLoRA's alpha/sqrt(r), a per-module rank) and modules_to_save, as PEFT merges."""
    folder = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=6.0, **variant)
    merged = read_adapter(folder).merged_into(WeightStore(base))
    expected = _peft_merged(base, folder)
    changed = 0
    for key in merged.keys():
        got = merged.get(key).to(torch.float32)
        torch.testing.assert_close(got, expected[key], rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(got, WeightStore(base).get(key))
    assert changed == 2 * 3 + int("modules_to_save" in variant)  # 2 layers x 3 targets (+ lm_head)


def test_merged_export_equals_transformers_with_peft(base, adapter, tmp_path):
    out = tmp_path / "out"
    manifest = export_and_optimize(str(base), out, ExportOptions(seq_length=SEQ, lora=str(adapter)))
    record = read_manifest(out).model.lora
    assert record.mode == "merged" and record.path == str(adapter.resolve()) and record.rank == 4
    assert record.targets == sorted(TARGETS) and record.modules == 2 * len(TARGETS)
    assert record.sha256 == read_adapter(adapter).sha256 and manifest.model.lora == record
    report = verify(out, prompt_length=6, new_tokens=8, seed=3)  # the reference: transformers + PEFT
    assert report.passed and report.tokens_equal, (report.hf_tokens, report.onnx_tokens)
    base_tokens, _ = hf_greedy(base, report.prompt, 8, set())
    assert base_tokens != report.onnx_tokens  # the adapter changes the model: the comparison above means something


def test_merged_export_refuses_another_adapter_at_verify_and_rebuilds_with_it(base, adapter, tmp_path):
    out = tmp_path / "out"
    export_and_optimize(str(base), out, ExportOptions(seq_length=SEQ, lora=str(adapter)))
    other = make_adapter(base, tmp_path / "other", seed=5, target_modules=("q_proj",))
    code, output = run("verify", out, "--lora", other)
    one_line(code, output, 2, "is another one")
    # The same OUT with the other adapter: resume keeps only what the adapter leaves unchanged (no block here)
    again = export_and_optimize(str(base), out, ExportOptions(seq_length=SEQ, lora=str(other)))
    assert {s for s in again.last_run.built if s.startswith("block")} == {
        s.name for s in again.segments if s.name.startswith("block")}
    assert "lm_head" in again.last_run.kept and again.model.lora.sha256 == read_adapter(other).sha256


def test_missing_adapter_folder(base, tmp_path):
    code, output = run("export-and-optimize", base, "-o", tmp_path / "o", "--seq-length", SEQ, "--lora", tmp_path / "nope")
    one_line(code, output, 3, "is not a folder")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_adapter_without_weights(base, adapter, tmp_path):
    folder = tmp_path / "cfg-only"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    code, output = run("export-and-optimize", base, "-o", tmp_path / "o", "--seq-length", SEQ, "--lora", folder)
    one_line(code, output, 3, "has no adapter_model.safetensors")


def test_dora_refused(base, tmp_path):
    folder = make_adapter(base, tmp_path / "dora", use_dora=True)
    code, output = run("export-and-optimize", base, "-o", tmp_path / "o", "--seq-length", SEQ, "--lora", folder)
    one_line(code, output, 4, "DoRA")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_adapter_of_another_base_refused(adapter, tmp_path):
    wider = build_model_dir(tmp_path / "wider", "llama", **dict(TINY_LLAMA, intermediate_size=64))
    code, output = run("export-and-optimize", wider, "-o", tmp_path / "o", "--seq-length", SEQ, "--lora", adapter)
    one_line(code, output, 3, "does not fit the model", "down_proj")


def test_other_peft_method_refused(base, adapter, tmp_path):
    folder = tmp_path / "ia3"
    folder.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, peft_type="IA3")))
    (folder / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    code, output = run("export-and-optimize", base, "-o", tmp_path / "o", "--seq-length", SEQ, "--lora", folder)
    one_line(code, output, 4, "IA3")


# -- LoRA inputs (--lora-max-rank R) ---------------------------------------------------------------------------

RANK = 6  # R > the adapter's r = 4: the runtime pads with zero rows


@pytest.fixture(scope="module")
def with_inputs(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-inputs") / "out"
    export_and_optimize(str(base), out, ExportOptions(seq_length=SEQ, lora_max_rank=RANK, with_test_data=True))
    return out


def test_lora_inputs_declared(with_inputs):
    import onnx

    manifest = read_manifest(with_inputs)
    assert manifest.model.lora.mode == "inputs" and manifest.model.lora.max_rank == RANK
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
    assert manifest.model.lora.targets == linears
    hidden, inter, kv = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"], 2 * 12
    for name in ("block_1", "block_cache_1"):
        graph_inputs = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                        for v in onnx.load(str(with_inputs / f"{name}.onnx")).graph.input}
        assert graph_inputs["self_attn.q_proj.lora_A"] == [RANK, hidden]
        assert graph_inputs["self_attn.v_proj.lora_B"] == [RANK, kv]
        assert graph_inputs["mlp.down_proj.lora_A"] == [RANK, inter]
        assert [t.name for t in manifest.segment(name).inputs][-2:] == ["mlp.down_proj.lora_A", "mlp.down_proj.lora_B"]
    assert not any("lora" in t.name for t in manifest.segment("lm_head").inputs)
    import numpy as np

    from tpugraph.export.compare_inputs import segment_npz

    with np.load(with_inputs / segment_npz("block_cache_1")) as data:  # tpu-mlir's compare inputs: zero LoRA inputs
        assert data["self_attn.q_proj.lora_A"].shape == (RANK, hidden) and not data["mlp.up_proj.lora_B"].any()


def test_lora_inputs_zeros_are_the_base_model(with_inputs):
    report = verify(with_inputs, prompt_length=6, new_tokens=8, seed=3)  # no adapter: zeros vs transformers
    assert report.passed and report.tokens_equal, (report.hf_tokens, report.onnx_tokens)


def test_lora_inputs_with_adapter_equal_transformers_with_peft(base, adapter, with_inputs):
    report = verify(with_inputs, prompt_length=6, new_tokens=8, seed=3, lora=adapter)
    assert report.passed and report.tokens_equal, (report.hf_tokens, report.onnx_tokens)
    base_tokens, _ = hf_greedy(base, report.prompt, 8, set())
    assert base_tokens != report.onnx_tokens  # the inputs carry the adapter, not zeros


def test_run_with_adapter_cli(adapter, with_inputs):
    code, output = run("-q", "run", with_inputs, "--prompt-ids", "5,9,13,4", "--max-new-tokens", "4")
    code_lora, output_lora = run("-q", "run", with_inputs, "--prompt-ids", "5,9,13,4", "--max-new-tokens", "4",
                                 "--lora", adapter)
    assert code == code_lora == 0, (output, output_lora)
    assert output.splitlines()[0] != output_lora.splitlines()[0]


def test_lora_inputs_with_history_kv_conversation(base, adapter, tmp_path):
    """block_kv_i takes the LoRA inputs too: a 2-turn conversation prefilling each turn on the KV history."""
    out = tmp_path / "out"
    export_and_optimize(str(base), out, ExportOptions(seq_length=SEQ, lora_max_rank=RANK, history_kv=True,
                                                      max_input_length=8))
    assert read_manifest(out).segment("block_kv_0").inputs[-1].name == "mlp.down_proj.lora_B"
    report = verify(out, prompt_length=5, new_tokens=4, seed=3, turns=2, lora=adapter)
    assert report.passed and report.tokens_equal, (report.hf_tokens, report.onnx_tokens)


def test_lora_inputs_refuse_a_larger_rank(base, with_inputs, tmp_path):
    big = make_adapter(base, tmp_path / "big", r=RANK + 2)
    code, output = run("verify", with_inputs, "--lora", big)
    one_line(code, output, 2, f"rank {RANK + 2}", f"rank <= {RANK}")


def test_lora_inputs_refuse_modules_to_save(base, with_inputs, tmp_path):
    folder = make_adapter(base, tmp_path / "mts", modules_to_save=["lm_head"])
    code, output = run("run", with_inputs, "--prompt-ids", "5,9", "--lora", folder)
    one_line(code, output, 2, "modules_to_save")


def test_no_lora_inputs_refuses_an_adapter(base, adapter, tmp_path):
    out = tmp_path / "plain"
    export_and_optimize(str(base), out, ExportOptions(seq_length=8, passes=["none"]))
    code, output = run("run", out, "--prompt-ids", "5,9", "--lora", adapter)
    one_line(code, output, 2, "no LoRA inputs")


def test_lora_and_max_rank_together_refused(base, adapter, tmp_path):
    code, output = run("export-and-optimize", base, "-o", tmp_path / "o", "--seq-length", SEQ, "--lora", adapter, "--lora-max-rank", "4")
    one_line(code, output, 2, "choose one")
