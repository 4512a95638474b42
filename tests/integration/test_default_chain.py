"""The default pass chain on real exports: what issue 3 promises of every segment."""

from __future__ import annotations

from collections import Counter

import onnx
import onnxsim
import pytest
from typer.testing import CliRunner

from tpugraph.cli import app
from tpugraph.contract.manifest import read_manifest
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.passes import DEFAULT_CHAIN
from tpugraph.proof.verify import verify

runner = CliRunner()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """tiny-llama exported with the default chain and with no pass at all."""
    base = tmp_path_factory.mktemp("chain")
    export_and_optimize("tiny-llama", base / "chain", ExportOptions(seq_length=64))
    export_and_optimize("tiny-llama", base / "raw", ExportOptions(seq_length=64, passes=[]))
    return base / "chain", base / "raw"


def test_every_segment_is_static_shape_free_and_tpu_loadable(outputs):
    out, _ = outputs
    for seg in read_manifest(out).segments:
        model = onnx.load(str(out / seg.file))
        ops = Counter(n.op_type for n in model.graph.node)
        assert ops["Shape"] == 0, seg.name
        for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
            assert all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim), (seg.name, vi.name)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset <= 17 and model.ir_version <= 9, (seg.name, opset, model.ir_version)


def test_blocks_are_no_bigger_than_onnxsim_alone(outputs):
    out, raw = outputs
    for name in ("block_0", "block_cache_0", "block_1", "block_cache_1"):
        ours = len(onnx.load(str(out / f"{name}.onnx")).graph.node)
        sim, ok = onnxsim.simplify(onnx.load(str(raw / f"{name}.onnx")), check_n=0)
        assert ok
        assert ours <= len(sim.graph.node), (name, ours, len(sim.graph.node))


def test_manifest_records_chain_and_every_result(outputs):
    out, raw = outputs
    manifest = read_manifest(out)
    assert [p.name for p in manifest.pass_chain] == list(DEFAULT_CHAIN)
    block = manifest.segment("block_0")
    assert [r["name"] for r in block.passes] == list(DEFAULT_CHAIN)
    for r in block.passes:
        assert {"modified", "nodes_before", "nodes_after", "seconds"} <= set(r)
    assert any(r["modified"] for r in block.passes)
    assert block.passes[0]["nodes_before"] > block.passes[-1]["nodes_after"]
    assert read_manifest(raw).pass_chain == []


def test_verify_still_passes_after_the_chain(outputs):
    out, _ = outputs
    assert verify(out, prompt_length=9, new_tokens=6).passed


def test_skip_pass_and_naming_convention(tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["export-and-optimize", "tiny-llama", "-o", str(out), "--seq-length", "16",
                            "--skip-pass", "simplify", "--naming", "optimum"])
    assert r.exit_code == 0, r.output
    manifest = read_manifest(out)
    assert "simplify" not in [p.name for p in manifest.pass_chain]
    assert manifest.conventions.naming == "optimum"
    block = manifest.segment("block_cache_1")
    assert [t.name for t in block.inputs][-2:] == ["past_key_values.1.key", "past_key_values.1.value"]
    assert [t.name for t in block.outputs][1:] == ["present.1.key", "present.1.value"]
    graph = onnx.load(str(out / "block_cache_1.onnx")).graph
    assert [i.name for i in graph.input][-2:] == ["past_key_values.1.key", "past_key_values.1.value"]
    # The runtime feeds by position, so the renamed segments still generate the same tokens.
    assert verify(out, prompt_length=4, new_tokens=4).passed


def test_a_failing_pass_names_itself_the_segment_and_what_ran_before(tmp_path, monkeypatch):
    from tpugraph.passes.remove_unused import RemoveUnused

    def boom(self, *args, **kwargs):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(RemoveUnused, "apply", boom)
    out = tmp_path / "o"
    r = runner.invoke(app, ["export-and-optimize", "tiny-llama", "-o", str(out), "--seq-length", "16"])
    assert r.exit_code == 6, r.output
    line = [l for l in r.output.splitlines() if l.startswith("error:")][0]
    assert "pass 'remove_unused' failed on segment 'embedding'" in line
    assert "fix_static_shapes, fold_constants, simplify, remove_identity, dedupe_initializers" in line
    assert "synthetic failure" in line
    assert not (out / "manifest.json").exists()
    assert not (out / "embedding.onnx").exists()


def test_passes_cli_list_run_check_and_inspect(outputs, tmp_path):
    out, raw = outputs
    r = runner.invoke(app, ["passes", "list"])
    assert r.exit_code == 0
    for name in DEFAULT_CHAIN:
        assert name in r.output
    target = tmp_path / "b.onnx"
    r = runner.invoke(app, ["passes", "run", "fix_static_shapes,simplify,tpu_compat", str(raw / "block_cache_0.onnx"),
                            "-o", str(target), "--check"])
    assert r.exit_code == 0, r.output
    assert "check past_k" in r.output and target.is_file()
    before = (raw / "block_cache_0.onnx").read_bytes()
    r = runner.invoke(app, ["passes", "run", "nope", str(raw / "block_cache_0.onnx"), "-o", str(tmp_path / "c.onnx")])
    assert r.exit_code == 2 and "unknown pass 'nope'" in r.output
    assert (raw / "block_cache_0.onnx").read_bytes() == before
    r = runner.invoke(app, ["inspect", str(target), "--json"])
    assert r.exit_code == 0
    import json

    info = json.loads(r.output)
    assert info["dynamic_dims"] == [] and info["unsupported_ops"] == [] and info["opset"] <= 17
    assert [i["name"] for i in info["inputs"]] == ["input_states", "position_ids", "attention_mask", "history_k", "history_v"]
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "block_cache_1" in r.output


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", b"\x08\x07\x12\x04junk"])
def test_corrupt_files_to_passes_run_and_inspect(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    for args in (["passes", "run", "simplify", str(bad), "-o", str(tmp_path / "o.onnx")], ["inspect", str(bad)]):
        r = runner.invoke(app, args)
        assert r.exit_code != 0, r.output
        assert "Traceback" not in r.output
        assert len([l for l in r.output.splitlines() if l.startswith("error:")]) == 1, r.output
        assert not (tmp_path / "o.onnx").exists()


def test_pass_progress_reports_each_pass_as_it_starts(make_model, tmp_path):
    from conftest import TINY_LLAMA

    from tpugraph.export.pipeline import ExportOptions, export_and_optimize

    model = make_model("llama", **TINY_LLAMA)
    seen: list[tuple] = []
    manifest = export_and_optimize(str(model), tmp_path / "o", ExportOptions(seq_length=16),
                                   pass_progress=lambda *call: seen.append(call))
    chain = [p.name for p in manifest.pass_chain]
    assert {s for s, *_ in seen} == {seg.name for seg in manifest.segments}
    assert all(n == len(chain) and chain[i] == p for _, p, i, n in seen)  # positions in the whole chain
    # block_0 runs the whole chain (its template's probe graph, the shared part once more) ...
    assert {i for s, _, i, _ in seen if s == "block_0"} == set(range(len(chain)))
    # ... a layer whose weights were swapped into block_0's graph only the layer-dependent rest of it.
    tail = [i for s, _, i, _ in seen if s == "block_1"]
    assert tail and tail == list(range(len(chain) - len(tail), len(chain)))
