"""The export is byte-identical to the one recorded before the concurrency/pass-contract redesign (issue #15).

Every preset is exported with the default options (plus a few option variants) and each output file's sha256
is compared with ``tests/data/export_hashes.json``. The manifest is compared without its volatile fields
(seconds, the preset's cache path, tool versions, resume fingerprints). The hashes depend on the torch/onnx/onnxsim/transformers
versions that produced them: with other versions the test is skipped, naming them.

Re-record (only when an output change is intended):
    PYTHONPATH=src python tests/integration/test_export_identity.py --record
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

HASHES = Path(__file__).parents[1] / "data" / "export_hashes.json"
PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-phi", "tiny-gemma2", "tiny-gemma3"]
# case name -> (preset, ExportOptions keyword arguments)
CASES: dict[str, tuple[str, dict]] = {p: (p, {}) for p in PRESETS}
CASES.update({
    "tiny-llama--jobs-2": ("tiny-llama", {"jobs": 2}),
    "tiny-llama--no-weight-swap": ("tiny-llama", {"weight_swap": False}),
    "tiny-qwen2--external-data-always--jobs-2": ("tiny-qwen2", {"external_data": "always", "jobs": 2}),
    "tiny-gemma2--dtype-float16": ("tiny-gemma2", {"dtype": "float16"}),
})
# fingerprint: a resume key that hashes the source path and tool versions too
VOLATILE_KEYS = {"seconds", "export_seconds", "fingerprint"}


def versions() -> dict[str, str]:
    import onnx
    import onnxsim
    import torch
    import transformers

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxsim": str(onnxsim.__version__),
            "transformers": transformers.__version__}


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def stable_manifest(path: Path) -> bytes:
    manifest = json.loads(path.read_text())
    manifest.pop("tools", None)
    manifest["model"]["source"].pop("path", None)
    return json.dumps(_stable(manifest), sort_keys=True).encode()


def output_hashes(out: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(out.iterdir()):
        data = stable_manifest(path) if path.name == "manifest.json" else path.read_bytes()
        hashes[path.name] = hashlib.sha256(data).hexdigest()
    return hashes


def export_case(case: str, out: Path) -> dict[str, str]:
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize

    preset, kwargs = CASES[case]
    export_and_optimize(preset, out, ExportOptions(**kwargs))
    return output_hashes(out)


def _recorded() -> dict:
    recorded = json.loads(HASHES.read_text())
    if recorded["versions"] != versions():
        pytest.skip(f"export hashes were recorded with {recorded['versions']}; this environment has {versions()}")
    return recorded


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_export_is_byte_identical_to_the_recorded_one(case, tmp_path):
    recorded = _recorded()
    assert case in recorded["cases"], f"no recorded hashes for {case}: re-record (see module docstring)"
    assert export_case(case, tmp_path / "out") == recorded["cases"][case]


def test_every_case_has_recorded_hashes():
    assert set(json.loads(HASHES.read_text())["cases"]) == set(CASES)


def record() -> None:
    import tempfile

    cases = {}
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            cases[case] = export_case(case, Path(tmp) / "out")
            print(case, len(cases[case]), "files")
    HASHES.parent.mkdir(exist_ok=True)
    HASHES.write_text(json.dumps({"versions": versions(), "cases": cases}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        record()
    else:
        sys.exit("usage: python tests/integration/test_export_identity.py --record")
