"""The manifest's typed records: one schema (manifest.schema.json generated from them), exact round trips (unknown
keys kept, key order kept), old manifests read, and `tpugraph manifest validate` checking the schema."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from tpugraph.contract.manifest import FORMAT_VERSION, Manifest, read_manifest, validate
from tpugraph.contract.manifest_records import GgufQuantization, ModelRecord, PackedQuantization, RecordedOptions
from tpugraph.contract.json_schema import schema_problems, shipped_schema
from tpugraph.contract.manifest_schema import generate_schema
from tpugraph.contract.records import JsonRecord, optional, record_schema
from tpugraph.contract.segments import SegmentKind
from tpugraph.errors import VerificationError

GOLDEN = Path(__file__).parents[1] / "data" / "manifest_golden.json"


def golden_cases() -> dict[str, dict]:
    """The recorded manifests, with the masked timings given numbers again (valid manifests)."""
    cases = json.loads(GOLDEN.read_text())["cases"]
    for case in cases.values():
        for seg in case["segments"]:
            seg["export_seconds"] = 0.25
    return cases


def test_the_shipped_schema_is_the_one_the_records_generate():
    # a field added to a record (or a record changed) without `python -m tpugraph.contract.manifest_schema` fails here
    assert shipped_schema() == generate_schema()


def test_a_new_record_field_changes_the_schema():
    @dataclasses.dataclass(kw_only=True)
    class Widened(RecordedOptions):
        new_option: int | None = optional()

    plain, widened = record_schema(RecordedOptions, {}), record_schema(Widened, {})
    assert set(widened["properties"]) - set(plain["properties"]) == {"new_option"}


def test_every_record_of_the_manifest_is_in_the_schema():
    defs = shipped_schema()["$defs"]
    for name in ("Manifest", "ModelRecord", "RecordedOptions", "Conventions", "ToolVersions", "SegmentEntry",
                 "TokenizerRecord", "SourceRecord", "LayerKv", "PackedQuantization", "GgufQuantization",
                 "EmbeddingTableRecord", "TestDataRecord", "ExternalDataFile", "PassChainEntry", "ExportStats"):
        assert name in defs, name
    assert defs["SegmentEntry"]["properties"]["kind"] == {"enum": [k.value for k in SegmentKind]}
    assert set(defs["ModelRecord"]["properties"]) >= {f.name for f in dataclasses.fields(ModelRecord)} - {"extra"}


@pytest.mark.parametrize("case", list(golden_cases()))
def test_recorded_manifests_round_trip_exactly_and_match_the_schema(case):
    data = golden_cases()[case]
    manifest = Manifest.from_json(copy.deepcopy(data))
    assert json.dumps(manifest.to_json()) == json.dumps(data)  # key order included
    assert schema_problems(data) == []
    assert all(isinstance(s.kind, SegmentKind) for s in manifest.segments)


def test_typed_fields_read_what_the_json_says():
    cases = golden_cases()
    gemma4 = Manifest.from_json(cases["gemma4"])
    raw = cases["gemma4"]["model"]
    assert gemma4.model.per_layer_embedding == raw["per_layer_embedding"] > 0
    assert [(r.layer, r.kv_heads, r.head_dim, r.kv_from) for r in gemma4.model.layers_kv] == [
        (r["layer"], r["kv_heads"], r["head_dim"], r["kv_from"]) for r in raw["layers_kv"]]
    options = Manifest.from_json(cases["llama-runtime-options"])
    assert options.options.input_length == 8 and options.options.history_kv is True
    assert options.conventions.embedding_disk.shape == [options.model.vocab_size, options.model.hidden_size]
    assert options.segment("block_0").io_mapping["input_states"] == "inputs_embeds"
    assert options.segment("block_0").test_data.file == "test_data/block_0_input.npz"
    quantized = Manifest.from_json(cases["llama-gptq"]).model.source_quantization
    assert isinstance(quantized, PackedQuantization) and quantized.bits == 4
    qwen = Manifest.from_json(cases["qwen3_5-tokenizer"])
    assert qwen.model.tokenizer.chat_template is True and qwen.model.state_layers == [0]
    gguf = ModelRecord.union_readers["source_quantization"]({"method": "gguf", "file": "m.gguf", "architecture": "llama",
                                                             "type_counts": {}, "tensor_types": {}})
    assert isinstance(gguf, GgufQuantization)


def test_unknown_keys_survive_at_every_level():
    data = golden_cases()["llama-runtime-options"]
    data["from_the_future"] = {"a": 1}
    for part in ("model", "tools", "conventions", "options", "stats"):
        data[part]["later_key"] = [part]
    data["model"]["source"]["later_key"] = 1
    data["model"]["tokenizer"]["later_key"] = 2
    data["conventions"]["embedding_disk"]["later_key"] = 3
    data["pass_chain"][0]["later_key"] = 4
    data["segments"][1]["later_key"] = 5
    data["segments"][1]["test_data"]["later_key"] = 6
    again = Manifest.from_json(copy.deepcopy(data)).to_json()
    assert again == data
    assert Manifest.from_json(data).options.extra == {"later_key": ["options"]}


def test_format_version_1_reads_and_a_newer_one_is_refused():
    data = golden_cases()["llama-test-data"]
    assert data["format_version"] == 1 == FORMAT_VERSION
    old = dict(data)
    del old["stats"], old["notes"]  # early manifests had neither
    old["options"] = {k: data["options"][k] for k in ("seq_length", "dtype", "int_dtype")}  # nor these options
    old["segments"] = [dict(s, test_data=s["test_data"]["file"]) for s in data["segments"]]  # nor test_data records
    manifest = Manifest.from_json(old)
    assert manifest.segments[0].test_data.file == data["segments"][0]["test_data"]["file"]
    assert manifest.notes == [] and manifest.stats.to_json() == {}
    assert manifest.options.to_json() == data["options"]  # the later options read as their defaults
    with pytest.raises(VerificationError, match="newer"):
        Manifest.from_json(dict(data, format_version=FORMAT_VERSION + 1))


def test_schema_problems_name_the_field_at_fault():
    data = golden_cases()["gemma4"]
    data["model"]["num_layers"] = "two"
    data["segments"][0]["kind"] = "decoder"
    del data["options"]["seq_length"]
    problems = schema_problems(data)
    assert "manifest.model.num_layers: must be integer, not \"two\"" in problems
    assert "manifest.options: lacks 'seq_length'" in problems
    assert any(p.startswith("manifest.segments[0].kind: \"decoder\" is not one of") for p in problems)
    assert len(problems) == 3


def test_records_write_only_what_they_hold():
    @dataclasses.dataclass(kw_only=True)
    class Small(JsonRecord):
        a: int
        b: str | None = optional()
        extra: dict = dataclasses.field(default_factory=dict)

    assert Small(a=1).to_json() == {"a": 1}
    assert Small.from_json({"a": 1, "b": "x", "z": 0}).to_json() == {"a": 1, "b": "x", "z": 0}
    with pytest.raises(KeyError):
        Small.from_json({"b": "x"})


@pytest.mark.slow
def test_manifest_validate_reports_a_schema_violation(tmp_path):
    from typer.testing import CliRunner

    from tpugraph.cli import app
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize

    out = tmp_path / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=16))
    assert validate(out) == []
    path = out / "manifest.json"
    data = json.loads(path.read_text())
    data["conventions"]["opset"] = "15"
    path.write_text(json.dumps(data, indent=2) + "\n")
    assert read_manifest(out).conventions.opset == "15"  # read as written: the check says what is wrong
    assert validate(out) == ['manifest.conventions.opset: must be integer, not "15"']
    result = CliRunner().invoke(app, ["manifest", "validate", str(out)])
    assert result.exit_code == 7
    assert 'MISMATCH manifest.conventions.opset: must be integer, not "15"' in result.output
