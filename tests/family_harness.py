"""Shared by the family tests: a tiny random-weight model of a family, exported and verified end to end.

A helper module, not a conftest: test modules import the root conftest by name, and a second
conftest.py would shadow it. Test modules import the fixture from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tpugraph.contract.manifest import Manifest
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import VerifyReport, verify

SEQ = 32
# Small enough that a family's variants take about a second each on two cores; GQA (4 heads, 2 KV heads).
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass
class Exported:
    model_dir: Path
    out: Path
    manifest: Manifest
    report: VerifyReport


def describe(report: VerifyReport) -> str:
    return (f"hf {report.hf_tokens} vs onnx {report.onnx_tokens}; min cosine {report.min_cosine:.7f}, "
            f"max rel diff {report.max_rel_diff:.2e}")


@pytest.fixture
def export_verify(make_model, tmp_path):
    """export_verify(model_type, seq=..., prompt_length=..., new_tokens=..., options=..., **config) -> Exported.

    Builds the model with save_pretrained, exports it through the real pipeline (no passes, so the test
    is about the exporter) and drives the segments like the TPU runtime against transformers' generate.
    """
    count = iter(range(1000))

    def run(model_type: str, *, seq: int = SEQ, prompt_length: int = 8, new_tokens: int = 8, seed: int = 0,
            options: dict | None = None, **config) -> Exported:
        folder = make_model(model_type, seed=seed, **{**TINY, **config})
        out = tmp_path / f"out-{next(count)}"
        manifest = export_and_optimize(str(folder), out, ExportOptions(seq_length=seq, passes=[], **(options or {})))
        report = verify(out, prompt_length=prompt_length, new_tokens=new_tokens, seed=seed)
        return Exported(folder, out, manifest, report)

    return run


def onnx_nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


# -- tpu-mlir: the real compiler on a family's representative segments ------------------------------------

TPU_MLIR_SEQ = 16  # the compile time is mostly the tools' start-up; a short window keeps the compares quick
TPU_MLIR_MIN_COSINE = 0.99  # the tools' own default tolerance for F16


def tpu_mlir_toolchain():
    """The tpu-mlir venv ($TPUGRAPH_TPU_MLIR_VENV or the setup script's default), or skip saying why."""
    import os

    from tpugraph.compiler import default_tpu_mlir_venv

    venv = default_tpu_mlir_venv()
    if not (venv / "bin" / "model_transform.py").exists():
        where = "$TPUGRAPH_TPU_MLIR_VENV" if os.environ.get("TPUGRAPH_TPU_MLIR_VENV") else "the default location"
        pytest.skip(f"tpu-mlir toolchain not found at {venv} ({where}): run scripts/setup_tpu_mlir.sh")
    return venv


def compile_segments_of(model_dir: Path, out: Path, venv: Path, segments=("block_0", "block_cache_0"),
                        seq: int = TPU_MLIR_SEQ, quantize: str = "f16"):
    """Export with the default pass chain and realistic test data, keep ``segments`` in the manifest, and
    run model_transform + model_deploy (with the tools' compares) on each -> CompileReport."""
    from tpugraph.compiler import CompileOptions, SegmentCompileError, compile_segments, format_table
    from tpugraph.contract.manifest import read_manifest
    from tpugraph.export.compare_inputs import write_test_data

    export_and_optimize(str(model_dir), out, ExportOptions(seq_length=seq))
    write_test_data(out)
    manifest = read_manifest(out)
    manifest.segments = [manifest.segment(name) for name in segments]
    manifest.write(out)
    try:
        # the two blocks at once: each tool run is mostly one core
        # check="all": the tools' compares on every kept segment (the manifest holds no whole model to drive end to end)
        return compile_segments(out, venv, CompileOptions(chip="bm1684x", quantize=quantize, check="all"),
                                jobs=min(2, len(segments)))
    except SegmentCompileError as err:
        table = format_table(err.report.results) if err.report else ""
        pytest.fail(f"{err}\n{table}")


def assert_compiled(report) -> None:
    for r in report.results:
        assert r.checked and r.transform_ok and r.deploy_ok, (r.segment, report.table())
        assert r.min_similarity is not None and r.min_similarity >= TPU_MLIR_MIN_COSINE, (r.segment, report.table())
