"""compile --dynamic without the compiler: the flags and transform options per kind, the refusal of prefill nets
the runtime cannot shorten, and the runtime's dynamic prefill (the n prompt rows only) giving the tokens of the
static one. The cmodel run of a dynamic bmodel is in test_history_kv_bmodel.py (it reuses that file's compile)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tpugraph.compiler import CompileOptions, deploy_flags
from tpugraph.compiler.plan import plan_compile
from tpugraph.contract.manifest import read_manifest
from tpugraph.contract.segments import MASK_VALUE
from tpugraph.errors import UsageError
from tpugraph.export.pipeline import ExportOptions, export_and_optimize
from tpugraph.runtime.loop import KvCache, SegmentRuntime

SEQ = 32
L = 8


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamic-prefill") / "out"
    export_and_optimize("tiny-llama", out, ExportOptions(seq_length=SEQ, max_input_length=L, history_kv=True))
    return out


def test_only_the_prefill_nets_get_dynamic_and_only_when_asked():
    static = CompileOptions(quantize="bf16").check_options()
    dynamic = CompileOptions(quantize="bf16", dynamic=True).check_options()
    for kind in ("block", "block_kv"):
        assert "--dynamic" in deploy_flags(kind, dynamic)
        assert "--dynamic" not in deploy_flags(kind, static)
        # otherwise the same flags as the static net (CONTRACT.md: block/block_kv get --dynamic in dynamic builds)
        assert [f for f in deploy_flags(kind, dynamic) if f != "--dynamic"] == deploy_flags(kind, static)
    for kind in ("embedding", "embedding_cache", "block_cache", "lm_head", "greedy_head"):
        assert deploy_flags(kind, dynamic) == deploy_flags(kind, static)
        assert "--dynamic" not in deploy_flags(kind, dynamic)
    assert "--dynamic" in deploy_flags("sample_head", static)  # always, as llm_convert deploys it
    assert dynamic.tag != static.tag  # its own work folder and script: a static compile of OUT is kept


def test_plan_frees_the_sequence_axis_of_the_prefill_nets_only(out):
    static = plan_compile(out, CompileOptions(quantize="bf16", check="none"))
    plan = plan_compile(out, CompileOptions(quantize="bf16", check="none", dynamic=True))
    kinds = {e.name: e.kind for e in read_manifest(out).segments}
    for step in plan.steps:
        if step.action == "transform":
            assert ("--dynamic-length" in step.argv) == (kinds[step.segment] in ("block", "block_kv")), step.segment
        if step.action == "deploy":
            assert ("--dynamic" in step.argv) == (kinds[step.segment] in ("block", "block_kv")), step.segment
    assert not any("--dynamic-length" in s.argv for s in static.steps)
    assert plan.bmodel.endswith("_dynamic.bmodel") and plan.bmodel != static.bmodel
    assert plan.work_dir != static.work_dir
    assert " --dynamic" in plan.command.split(" --no-check")[0] and " --dynamic" not in static.command


def test_prefill_nets_with_other_inputs_are_refused(out):
    manifest = read_manifest(out)
    block = manifest.segment("block_0")
    extra = dataclasses.replace(block.inputs[0], name="per_layer_input")
    changed = dataclasses.replace(block, inputs=[*block.inputs, extra])
    odd = dataclasses.replace(manifest, segments=[changed if s.name == "block_0" else s for s in manifest.segments])
    plan_compile(out, CompileOptions(quantize="bf16"), manifest=odd)  # static: fine
    with pytest.raises(UsageError, match=r"--dynamic: block_0 takes .*per_layer_input"):
        plan_compile(out, CompileOptions(quantize="bf16", dynamic=True), manifest=odd)


@pytest.mark.parametrize("family", ["gemma3", "phi3", "no-such-family"])
def test_families_not_checked_dynamic_are_refused(out, family):
    manifest = read_manifest(out)
    other = dataclasses.replace(manifest, model=dataclasses.replace(manifest.model, family=family))
    plan_compile(out, CompileOptions(quantize="bf16"), manifest=other)  # static: fine
    with pytest.raises(UsageError, match=rf"--dynamic: the prefill nets of family '{family}' .*llama, qwen2, qwen3"):
        plan_compile(out, CompileOptions(quantize="bf16", dynamic=True), manifest=other)


class _DynamicOnOnnx:
    """The ONNX nets playing dynamic ones: a prefill net given n < L rows is run padded to L (mask value in the
    padded mask entries) and its outputs cut back to n rows; every shape it was given is noted."""

    dynamic_prefill = True

    def __init__(self, out, manifest):
        from tpugraph.runtime.backends.onnxruntime_backend import OnnxBackend

        self.onnx = OnnxBackend(out, manifest)
        self.name = "onnx as dynamic"
        self.shapes: dict[str, list] = {}

    def run(self, net, *arrays):
        arrays = [np.asarray(a) for a in arrays]
        if not net.startswith("block_") or net.startswith("block_cache_"):
            return self.onnx.run(net, *arrays)
        self.shapes.setdefault(net, []).append([a.shape for a in arrays])
        hidden, pos, mask, *history = arrays
        n = hidden.shape[1]
        full_h = np.zeros((1, L, hidden.shape[2]), np.float32)
        full_h[:, :n] = hidden
        full_p = np.zeros((1, L), pos.dtype)
        full_p[:, :n] = pos
        width = L if not history else SEQ + L
        full_m = np.full((1, 1, L, width), MASK_VALUE, np.float32)
        if history:  # columns: SEQ history ones, then the new tokens'
            full_m[:, :, :n, :SEQ] = mask[:, :, :, :SEQ]
            full_m[:, :, :n, SEQ: SEQ + n] = mask[:, :, :, SEQ:]
        else:
            full_m[:, :, :n, :n] = mask
        return [o[:, :n] for o in self.onnx.run(net, full_h, full_p, full_m, *history)]

    def close(self):
        self.onnx.close()


def test_runtime_runs_dynamic_prefill_nets_at_the_prompts_length(out):
    manifest = read_manifest(out)
    H = manifest.segment("block_0").inputs[0].shape[2]
    prompt = np.random.default_rng(3).integers(3, 256, size=L + 3).tolist()  # block_0 at L, block_kv_0 at 3
    short = prompt[:5]  # block_0 at 5
    static = SegmentRuntime(out, manifest)
    backend = _DynamicOnOnnx(out, manifest)
    dynamic = SegmentRuntime(out, manifest, backend=backend)
    assert dynamic.dynamic_prefill and not static.dynamic_prefill
    for ids in (short, prompt):
        want = static.generate(ids, 4, cache=KvCache())
        got = dynamic.generate(ids, 4, cache=KvCache())
        assert got.tokens == want.tokens
        for a, b in zip(got.logits, want.logits):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert backend.shapes["block_0"][0] == [(1, 5, H), (1, 5), (1, 1, 5, 5)]
    assert backend.shapes["block_0"][1] == [(1, L, H), (1, L), (1, 1, L, L)]
    kv = manifest.segment("block_kv_0").inputs[3].shape
    assert backend.shapes["block_kv_0"] == [[(1, 3, H), (1, 3), (1, 1, 3, SEQ + 3), tuple(kv), tuple(kv)]]
