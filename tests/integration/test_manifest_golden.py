"""manifest.json is the same JSON, key for key and in the same order, as before the manifest became typed records.

``tests/data/manifest_golden.json`` holds the manifests the dict-built manifest code wrote for a few exports that
between them reach every optional record (test data, runtime options, the embedding table, I/O renaming, per-layer
KV, state layers, a tokenizer, a quantized source). The comparison keeps key order (no sort_keys); only what
changes from run to run is masked: timings, resume fingerprints, the source's path and the tool versions' values.
Sizes and digests depend on the torch/onnx/onnxsim/transformers versions: with other versions the test is skipped.

Re-record (only when a manifest change is intended):
    PYTHONPATH=src:tests:tests/integration python tests/integration/test_manifest_golden.py --record
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parents[1] / "data" / "manifest_golden.json"
VOLATILE_KEYS = {"seconds", "export_seconds", "fingerprint"}
SEQ = 32


def versions() -> dict[str, str]:
    from test_export_identity import versions as tool_versions

    return tool_versions()


def _model(case: str, folder: Path) -> str:
    """The MODEL argument of a case: a preset name, or a folder built here."""
    from conftest import build_model_dir, save_word_tokenizer

    if case == "qwen3_5-tokenizer":
        build_model_dir(folder, "qwen3_5_text", vocab_size=320, hidden_size=48, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                        linear_value_head_dim=12, linear_conv_kernel_dim=4, full_attention_interval=2,
                        max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
        save_word_tokenizer(folder, 320, "{% for m in messages %}{{ m['content'] }} {% endfor %}")
        return str(folder)
    if case == "llama-gptq":
        from quant_checkpoints import Variant, write_quantized

        write_quantized(folder, Variant("gptq", 4, 16, True))
        return str(folder)
    return {"llama-test-data": "tiny-llama", "llama-runtime-options": "tiny-llama", "gemma4": "tiny-gemma4"}[case]


CASES: dict[str, dict] = {
    "llama-test-data": dict(with_test_data=True),
    "llama-runtime-options": dict(sample_head="current", history_kv=True, max_input_length=8, embedding_disk=True,
                                  naming="optimum", with_test_data=True),
    "gemma4": {},
    "qwen3_5-tokenizer": {},
    "llama-gptq": {},
}


def _masked(value, key: str = ""):
    if isinstance(value, dict):
        return {k: ("*" if k in VOLATILE_KEYS else _masked(v, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def masked_manifest(text: str) -> dict:
    manifest = json.loads(text)
    manifest["tools"] = {k: "*" for k in manifest["tools"]}
    manifest["model"]["source"]["path"] = "*"
    return _masked(manifest)


def export_case(case: str, tmp: Path) -> str:
    """The manifest.json text of a fresh export of ``case``."""
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize

    model = _model(case, tmp / "model")
    export_and_optimize(model, tmp / "out", ExportOptions(seq_length=SEQ, **CASES[case]))
    return (tmp / "out" / "manifest.json").read_text()


def _recorded() -> dict:
    recorded = json.loads(GOLDEN.read_text())
    if recorded["versions"] != versions():
        pytest.skip(f"golden manifests were recorded with {recorded['versions']}; this environment has {versions()}")
    return recorded


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_manifest_is_the_recorded_json_in_the_recorded_order(case, tmp_path):
    recorded = _recorded()["cases"][case]
    text = export_case(case, tmp_path)
    fresh = masked_manifest(text)
    # indent=2 and no key sorting: the same bytes, key order included, once the volatile values are masked
    assert json.dumps(fresh, indent=2) == json.dumps(recorded, indent=2)
    assert text == json.dumps(json.loads(text), indent=2) + "\n"  # the writer's own layout


def test_every_case_is_recorded():
    assert set(json.loads(GOLDEN.read_text())["cases"]) == set(CASES)


def record() -> None:
    import tempfile

    cases = {}
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            cases[case] = masked_manifest(export_case(case, Path(tmp)))
            print(case, len(cases[case]["segments"]), "segments")
    GOLDEN.write_text(json.dumps({"versions": versions(), "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        record()
    else:
        sys.exit("usage: PYTHONPATH=src:tests:tests/integration python tests/integration/test_manifest_golden.py --record")
