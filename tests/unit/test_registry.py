"""Guards on the family registry: every family tested, specs consistent with transformers, refusals clear."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

from tpugraph.errors import UnsupportedModelError
from tpugraph.export.exporter import export_notes
from tpugraph.source.checkpoint import ModelSource, load_config
from tpugraph.source.families import (
    FAMILIES,
    SLIDING_ALL,
    SLIDING_BY_LAYER_TYPE,
    SLIDING_NONE,
    family_for,
    supported_architectures,
)

FAMILY_TESTS = Path(__file__).parents[1] / "integration" / "families"  # where each family's tiny-model test lives


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_has_a_tiny_model_test(family):
    sources = "\n".join(p.read_text() for p in FAMILY_TESTS.glob("test_*.py"))
    names = [family.name, *family.model_types]
    assert any(re.search(rf"""["']{re.escape(n)}["']""", sources) for n in names), (
        f"family '{family.name}' has no test in tests/integration/families/")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_spec_matches_installed_transformers(family):
    from transformers.models.auto import modeling_auto

    # the mapping of the auto class the family builds its models with (vision-language: image-text-to-text)
    mapping = {"AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
               "AutoModelForImageTextToText": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}[family.auto_class]
    assert Version(transformers.__version__) >= Version(family.min_transformers)
    for model_type in family.model_types:
        assert mapping.get(model_type) in family.architectures
    assert (family.vision is None) == (family.auto_class == "AutoModelForCausalLM")
    assert family.sliding_layers in (SLIDING_NONE, SLIDING_ALL, SLIDING_BY_LAYER_TYPE)
    assert family.embeddings in ("tied", "untied", "either")
    assert family.describe() and json.dumps(family.to_json())


def test_too_old_transformers_is_refused_with_the_version():
    gemma2 = family_for("gemma2", None)
    with pytest.raises(UnsupportedModelError, match=r"gemma2.*transformers>=4\.57.*installed is 4\.51\.3"):
        gemma2.check_transformers("4.51.3")
    gemma2.check_transformers("4.57.0.dev0")  # a pre-release of the verified release is its code
    gemma2.check_transformers("5.24.0")


def test_names_and_architectures_are_unique():
    names = [f.name for f in FAMILIES]
    archs = [a for f in FAMILIES for a in f.architectures]
    assert len(names) == len(set(names)) and len(archs) == len(set(archs))
    assert supported_architectures() == sorted(archs)


def test_lookup_by_architecture_then_model_type():
    assert family_for("qwen2", ["Qwen2ForCausalLM"]).name == "qwen2"
    assert family_for("gemma3_text", None).name == "gemma3"
    assert family_for(None, ["PhiForCausalLM"]).norm_path == "model.final_layernorm"


@pytest.mark.parametrize("archs,model_type", [(["GPT2LMHeadModel"], "gpt2"),
                                              (["LlavaForConditionalGeneration"], "llava"),
                                              (None, "mamba")])
def test_unsupported_architecture_is_named_and_points_to_the_families_command(archs, model_type):
    with pytest.raises(UnsupportedModelError) as err:
        family_for(model_type, archs)
    message = str(err.value)
    assert (archs[0] if archs else model_type) in message
    # the supported list is `tpugraph families`, not ~40 names in one error line
    assert "`tpugraph families`" in message and "LlamaForCausalLM" not in message


def _remote_code_model(folder: Path, sentinel: Path, arch: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": [arch], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}))
    code = f"open({str(sentinel)!r}, 'w').write('remote code ran')\n"
    (folder / "configuration_internlm2.py").write_text(code)
    (folder / "modeling_internlm2.py").write_text(code)
    return folder


def test_remote_code_is_refused_and_never_run(tmp_path):
    sentinel = tmp_path / "ran"
    folder = _remote_code_model(tmp_path / "m", sentinel, "InternLM2ForCausalLM")
    with pytest.raises(UnsupportedModelError, match="remote code.*--trust-remote-code"):
        load_config(ModelSource(folder))
    # Even with the flag, an architecture outside the registry is refused before any code is loaded.
    with pytest.raises(UnsupportedModelError, match="InternLM2ForCausalLM.*`tpugraph families` lists the supported"):
        load_config(ModelSource(folder), trust_remote_code=True)
    assert not sentinel.exists()


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_sliding_window_per_layer():
    mistral, gemma2, llama = family_for("mistral", None), family_for("gemma2", None), family_for("llama", None)
    assert [mistral.sliding_window(_Config(sliding_window=8), i) for i in range(2)] == [8, 8]
    assert mistral.sliding_window(_Config(sliding_window=None), 0) is None
    typed = _Config(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    assert [gemma2.sliding_window(typed, i) for i in range(2)] == [8, None]
    assert llama.sliding_window(_Config(sliding_window=8), 0) is None


def test_notes_say_when_the_window_matters():
    gemma2 = family_for("gemma2", None)
    config = _Config(num_hidden_layers=4, sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2)
    (short,) = export_notes(gemma2, config, seq=16)
    assert "layers 0, 2" in short and "SEQ=16 <= 16" in short and "exact" in short
    (long,) = export_notes(gemma2, config, seq=64)
    assert "SEQ=64 > 16" in long and "position_ids" in long
    assert export_notes(family_for("llama", None), _Config(num_hidden_layers=2), seq=64) == []
    (fp16,) = export_notes(family_for("llama", None), _Config(num_hidden_layers=2), seq=64, dtype="float16")
    assert "float16" in fp16 and "float32" in fp16


def test_notes_flag_sequence_dependent_rope():
    phi3 = family_for("phi3", None)
    config = _Config(num_hidden_layers=2, sliding_window=None,
                     rope_parameters={"rope_type": "longrope", "original_max_position_embeddings": 4096})
    (note,) = export_notes(phi3, config, seq=8192)
    assert "longrope" in note and "4096" in note
    assert export_notes(phi3, config, seq=4096) == []  # transformers picks the same factors


def test_known_unsupported_architecture_names_the_reason(monkeypatch):
    """NOT_YET (empty since issue #24's families are exported): an architecture listed there is refused with its
    reason, exit 4, in one line."""
    from tpugraph.source import families

    arch, why = "HybridMadeUpForCausalLM", "its made-up layers need segments the contract does not have"
    monkeypatch.setitem(families.NOT_YET, arch, why)
    with pytest.raises(UnsupportedModelError) as err:
        family_for(None, [arch])
    message = str(err.value)
    assert f"architecture {arch} is not supported yet: " in message and "contract" in message
    assert "`tpugraph families`" in message and "\n" not in message and err.value.exit_code == 4


def test_hybrid_moe_architectures_are_families_now():
    """Issue #24: the gated-DeltaNet state segments combined with experts; no longer refused as not yet."""
    assert family_for(None, ["Qwen3NextForCausalLM"]).name == "qwen3_next"
    assert family_for(None, ["Qwen3_5MoeForCausalLM"]).name == "qwen3_5_moe_text"
    # the vision-language checkpoint: its text model
    assert family_for("qwen3_5_moe", ["Qwen3_5MoeForConditionalGeneration"]).name == "qwen3_5_moe_text"


def test_a_refused_config_attribute_names_itself_and_the_reason():
    """refused_configs (no family sets one since Gemma 4's MoE is exported): a truthy attribute is refused
    with the reason, exit 4; unset or false passes."""
    from dataclasses import replace
    from types import SimpleNamespace

    fam = replace(family_for("llama", None), refused_configs=(("use_magic", "magic is not exported"),))
    with pytest.raises(UnsupportedModelError) as err:
        fam.check_config(SimpleNamespace(use_magic=True))
    assert "use_magic" in str(err.value) and "magic is not exported" in str(err.value) and err.value.exit_code == 4
    fam.check_config(SimpleNamespace(use_magic=False))
    fam.check_config(SimpleNamespace())
