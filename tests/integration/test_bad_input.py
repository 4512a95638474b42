"""The bad-input matrix: each case gets one clear line, a documented exit code, and nothing half-written
presented as complete."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from cli_harness import one_line, run
from conftest import TINY_LLAMA, build_model_dir


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("good"), "llama", **TINY_LLAMA)


def clone(good_model, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(good_model, target)
    return target


def assert_nothing_presented_as_done(out):
    assert not (out / "manifest.json").exists()


def test_config_not_json(good_model, tmp_path):
    model = clone(good_model, tmp_path)
    (model / "config.json").write_text("{not json")
    code, out = run("export-and-optimize", model, "-o", tmp_path / "o")
    one_line(code, out, 3, "config.json is not valid JSON")
    assert not (tmp_path / "o").exists()


def test_config_lacks_required_fields(good_model, tmp_path):
    model = clone(good_model, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    del cfg["hidden_size"]
    cfg["num_hidden_layers"] = 0
    (model / "config.json").write_text(json.dumps(cfg))
    code, out = run("export-and-optimize", model, "-o", tmp_path / "o")
    one_line(code, out, 3, "lacks required fields", "num_hidden_layers")


def test_weights_missing(good_model, tmp_path):
    model = clone(good_model, tmp_path)
    (model / "model.safetensors").unlink()
    code, out = run("export-and-optimize", model, "-o", tmp_path / "o", "--seq-length", 16)
    one_line(code, out, 3, "no *.safetensors")
    assert not (tmp_path / "o").exists()


def test_truncated_safetensors(good_model, tmp_path):
    model = clone(good_model, tmp_path)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, out = run("export-and-optimize", model, "-o", tmp_path / "o", "--seq-length", 16)
    one_line(code, out, 3, "model.safetensors")
    assert_nothing_presented_as_done(tmp_path / "o")


def test_sharded_index_names_a_missing_shard(good_model, tmp_path):
    model = clone(good_model, tmp_path)
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    code, out = run("export-and-optimize", model, "-o", tmp_path / "o", "--seq-length", 16)
    one_line(code, out, 3, "model-00001-of-00002.safetensors", "missing")


def test_remote_code_is_refused_without_the_flag(good_model, tmp_path):
    model = clone(good_model, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    cfg["architectures"] = ["EvilForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "modeling_evil.py").write_text("raise SystemExit('remote code was executed')\n")
    code, out = run("export-and-optimize", model, "-o", tmp_path / "o")
    one_line(code, out, 4, "needs remote code", "--trust-remote-code")


@pytest.mark.parametrize("args,needle", [
    (["--dtype", "float8"], "--dtype"),
    (["--int-dtype", "int16"], "--int-dtype"),
    (["--seq-length", "0"], "--seq-length"),
    (["--jobs", "-1", "--seq-length", "16"], "--jobs"),
    (["--passes", "no_such_pass", "--seq-length", "16"], "no_such_pass"),
])
def test_invalid_options(good_model, tmp_path, args, needle):
    code, out = run("export-and-optimize", good_model, "-o", tmp_path / "o", *args)
    one_line(code, out, 2, needle)
    assert not (tmp_path / "o").exists()


def test_disk_full_during_a_write_leaves_no_half_file(good_model, tmp_path, monkeypatch):
    from tpugraph.export import committer

    real_save = committer._write  # where each inline segment's bytes are written
    calls = {"n": 0}

    def failing_save(path, data):
        calls["n"] += 1
        if calls["n"] == 4:  # after the vocab unit (embedding, embedding_cache, lm_head): block_0
            with open(path, "wb") as fh:
                fh.write(b"\x08\x07partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, data)

    monkeypatch.setattr(committer, "_write", failing_save)
    out = tmp_path / "o"
    # one thread: the 4th file written is block_0's
    code, output = run("export-and-optimize", good_model, "-o", out, "--seq-length", 16, "--jobs", "1")
    one_line(code, output, 5, "No space left on device", "block_0.onnx")
    assert_nothing_presented_as_done(out)
    assert not (out / "block_0.onnx").exists(), "a half-written file must not stand under its final name"
    assert not list(out.glob(".tpugraph-stage-*")) and not list(out.glob(".tpugraph-work-*"))
    partial = json.loads((out / ".tpugraph-partial.json").read_text())
    assert [s["name"] for s in partial["segments"]] == ["embedding", "embedding_cache", "lm_head"]
    # With space again, a rerun finishes and keeps what was done.
    monkeypatch.setattr(committer, "_write", real_save)
    code, output = run("-v", "export-and-optimize", good_model, "-o", out, "--seq-length", 16)
    assert code == 0, output
    assert (out / "manifest.json").is_file() and not (out / ".tpugraph-partial.json").exists()


def test_a_failing_unit_of_a_parallel_run_stops_it_cleanly(good_model, tmp_path, monkeypatch):
    import onnx

    from tpugraph.export import committer

    real_save, real_write = onnx.save_model, committer._write  # segments with external data / inline

    def failing_save(model, f, *args, **kwargs):
        if Path(f).name == "block_cache_1.onnx":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(model, f, *args, **kwargs)

    def failing_write(path, data):
        if Path(path).name == "block_cache_1.onnx":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(onnx, "save_model", failing_save)
    monkeypatch.setattr(committer, "_write", failing_write)
    out = tmp_path / "o"
    code, output = run("export-and-optimize", good_model, "-o", out, "--seq-length", 16, "--jobs", "2")
    one_line(code, output, 5, "No space left on device", "block_cache_1.onnx")
    assert_nothing_presented_as_done(out)
    assert not (out / "block_cache_1.onnx").exists() and not (out / "layer_1.data").exists()
    assert not list(out.glob(".tpugraph-stage-*")) and not list(out.glob(".tpugraph-work-*"))
    monkeypatch.setattr(onnx, "save_model", real_save)
    monkeypatch.setattr(committer, "_write", real_write)
    code, output = run("export-and-optimize", good_model, "-o", out, "--seq-length", 16, "--jobs", "2")
    assert code == 0, output
    assert (out / "manifest.json").is_file() and (out / "block_cache_1.onnx").is_file()


def test_manifest_hash_mismatch_fails_validate(good_model, tmp_path):
    out = tmp_path / "o"
    assert run("export-and-optimize", good_model, "-o", out, "--seq-length", 16)[0] == 0
    blob = bytearray((out / "block_1.onnx").read_bytes())
    blob[-1] ^= 0xFF
    (out / "block_1.onnx").write_bytes(bytes(blob))
    code, output = run("manifest", "validate", out)
    assert code == 7
    assert "block_1: sha256 of block_1.onnx does not match the manifest" in output
    code, output = run("verify", out)
    one_line(code, output, 7, "block_1", "sha256")


def test_verify_refuses_unfinished_output(good_model, tmp_path):
    out = tmp_path / "o"
    assert run("export-and-optimize", good_model, "-o", out, "--seq-length", 16)[0] == 0
    (out / "manifest.json").rename(out / ".tpugraph-partial.json")
    code, output = run("verify", out)
    one_line(code, output, 7, "unfinished export")
