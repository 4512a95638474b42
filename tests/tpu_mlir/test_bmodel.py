"""The combined bmodel on tpu-mlir's cmodel: tpugraph run --backend bmodel and verify --bmodel, with the real
compiler. Tiny preset, SEQ 16, a few tokens: the cmodel takes about a second per net run on this machine."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.compiler import CompileOptions, compile_segments
from tpugraph.errors import UsageError, VerificationError
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.proof.verify import verify
from tpugraph.runtime.text import run_prompt

pytestmark = pytest.mark.slow

SEQ = 16
PROMPT = [1, 45, 97, 200]
runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("bmodel") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ))
    return out


@pytest.fixture(scope="module", params=["f16", "bf16"])
def compiled(request, exported, toolchain):
    """F16 with compile's default check (no test data here: the end-to-end verify --bmodel of 3 tokens only),
    BF16 unchecked and verified by the test itself."""
    check = "representative" if request.param == "f16" else "none"
    report = compile_segments(exported, toolchain, CompileOptions(quantize=request.param, check=check), jobs=2)
    return request.param, report


def test_verify_bmodel_passes_token_for_token(compiled, exported, toolchain):
    mode, compile_report = compiled
    if mode == "f16":  # compile's default check ran it
        report = compile_report.end_to_end
        assert report is not None and compile_report.passed and len(report.prompt) == 4
    else:
        assert compile_report.end_to_end is None
        report = verify(exported, prompt=PROMPT, new_tokens=3, bmodel=compile_report.bmodel, tpu_mlir=toolchain)
    assert report.dtype == f"bmodel-{mode}" and report.backend.startswith("bmodel on the cmodel")
    assert not report.teacher_forced and report.tokens_equal and len(report.hf_tokens) == 3
    assert report.passed, report.to_json()
    assert report.min_cosine >= report.thresholds[0]
    if mode == "bf16":  # issue #12 item 7: verify --bmodel drives the F16 pattern 0xF0E2 (as BF16: about -5.5e29)
        assert report.mask_check["pattern"] == "0xF0E2" and report.mask_check["tokens"] == report.onnx_tokens
    else:  # compile's own end-to-end check leaves it to verify --bmodel
        assert report.mask_check is None


def test_run_backend_bmodel_streams_the_onnx_tokens(compiled, exported, toolchain):
    bmodel = compiled[1].bmodel
    onnx = run_prompt(exported, prompt_ids=PROMPT, max_new_tokens=2)
    r = runner.invoke(app, ["run", str(exported), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                            "2", "--backend", "bmodel", "--bmodel", str(bmodel), "--tpu-mlir", str(toolchain)])
    assert r.exit_code == 0, r.output
    assert r.output.split("\n")[0].split() == [str(t) for t in onnx.tokens]
    assert "tokens/s" in r.output and "bmodel on the cmodel (bm1684x)" in r.output


def test_a_bmodel_of_another_output_is_refused(compiled, toolchain, tmp_path):
    bmodel = compiled[1].bmodel
    other = tmp_path / "other"
    export_and_optimize("tiny-llama", other, ExportOptions(seq_length=8))
    with pytest.raises(VerificationError, match="was not compiled from this output: net embedding has input shapes"):
        verify(other, prompt=PROMPT, new_tokens=2, bmodel=bmodel, tpu_mlir=toolchain)
    r = runner.invoke(app, ["run", str(other), "--prompt-ids", "1,2", "--backend", "bmodel", "--bmodel", str(bmodel),
                            "--tpu-mlir", str(toolchain)])
    assert r.exit_code == 7 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("error: ")


def test_a_file_that_is_no_bmodel_is_one_line(exported, toolchain, tmp_path):
    fake = tmp_path / "fake.bmodel"
    fake.write_bytes(b"\0" * 4096)
    with pytest.raises(UsageError, match="fake.bmodel"):
        verify(exported, prompt=PROMPT, new_tokens=2, bmodel=fake, tpu_mlir=toolchain)
