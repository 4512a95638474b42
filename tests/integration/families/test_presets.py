"""The per-family presets: each loads through the real preset path, exports and verifies."""

import pytest

from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify
from tpugraph.source.checkpoint import load_preset, preset_names
from tpugraph.source.families import family_for

PRESETS = [p for p in preset_names() if p != "tiny-llama"]  # tiny-llama is covered by tests/integration/test_cli.py


def test_there_is_a_preset_per_core_family():
    families = {family_for(load_preset(p)["config"]["model_type"], load_preset(p)["config"]["architectures"]).name
                for p in preset_names()}
    assert {"llama", "qwen2", "qwen3", "phi3", "phi", "gemma2", "gemma3"} <= families


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_exports_and_verifies(preset, tmp_path):
    manifest = export_and_optimize(preset, tmp_path / "out", ExportOptions(seq_length=32, passes=[]))
    assert manifest.model.source.random_weights
    report = verify(tmp_path / "out", prompt_length=6, new_tokens=6)
    assert report.passed, (report.hf_tokens, report.onnx_tokens, report.min_cosine)
