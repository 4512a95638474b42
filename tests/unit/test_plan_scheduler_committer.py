"""The three parts of an export run, each alone: the pure plan, the scheduler's order constraints, the
committer's crash safety; and module_signature, which decides which layers share a graph (issue #15)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tpugraph.contract.manifest import PARTIAL_NAME, Manifest, SegmentEntry
from tpugraph.contract.segments import ContractDims, segment_specs
from tpugraph.errors import OutputError
from tpugraph.export.committer import Committer, UnitWriter
from tpugraph.export.factory import module_signature
from tpugraph.export.plan import WorkUnit, leaders, plan_units
from tpugraph.export.scheduler import Scheduler

DIMS = ContractDims(seq=8, hidden=16, kv_heads=2, head_dim=8, vocab=64, layers=3, int_dtype="int32")


class _Weights:
    """A WeightStore look-alike: every layer holds one 4 KB tensor, the embedding 1 MB."""

    def __init__(self, layers: int = 3):
        self._shapes = {"model.embed_tokens.weight": ((512, 512), "F32"),
                        **{f"model.layers.{i}.mlp.weight": ((32, 32), "F32") for i in range(layers)}}

    def keys(self):
        return list(self._shapes)

    def shape_and_dtype(self, key):
        return self._shapes[key]


def _empty_manifest() -> Manifest:
    """A manifest whose parts the committer only writes back (the segments are what these tests look at)."""
    return Manifest(model={}, tools={}, conventions={}, options={})


def _family():
    from tpugraph.source.families import FAMILIES

    return next(f for f in FAMILIES if f.name == "llama")


# -- plan ------------------------------------------------------------------------------------------
def test_plan_groups_the_vocabulary_and_each_layer_in_contract_order():
    specs = segment_specs(DIMS)
    units = plan_units(specs, _family(), _Weights(), 4, "auto")
    assert [u.name for u in units] == ["vocab", "layer_0", "layer_1", "layer_2", "greedy_head"]
    assert [s.name for s in units[0].specs] == ["embedding", "embedding_cache", "lm_head"]
    assert [s.name for s in units[2].specs] == ["block_1", "block_cache_1"]
    assert all(u.data_file is None for u in units)  # auto: nothing is over 16 MB


def test_plan_gives_a_data_file_to_units_with_weights_only():
    units = plan_units(segment_specs(DIMS), _family(), _Weights(), 4, "always")
    assert {u.name: u.data_file for u in units} == {
        "vocab": "vocab.data", "layer_0": "layer_0.data", "layer_1": "layer_1.data", "layer_2": "layer_2.data",
        "greedy_head": None}
    assert all(u.data_file is None for u in plan_units(segment_specs(DIMS), _family(), _Weights(), 4, "never"))


def test_leaders_make_each_structure_wait_for_its_first_unit():
    units = [WorkUnit(n, [], []) for n in ("vocab", "layer_0", "layer_1", "layer_2", "layer_3", "head")]
    keys = {"layer_0": "sliding", "layer_1": "global", "layer_2": "sliding", "layer_3": "global"}
    assert leaders(units, lambda u: keys.get(u.name)) == {"layer_2": "layer_0", "layer_3": "layer_1"}


# -- scheduler -------------------------------------------------------------------------------------
class _RecordingScheduler(Scheduler):
    """Units sleep instead of building; each records when it started and ended."""

    def __init__(self, out_dir, slow: dict[str, float], fail: str | None = None):
        super().__init__(out_dir, {}, Committer(out_dir, _empty_manifest()), None, 0, lambda: None)
        self.slow, self.fail = slow, fail
        self.events: list[tuple[str, str]] = []
        self._events_lock = threading.Lock()

    def unit(self, unit, pending_fingerprint):
        with self._events_lock:
            self.events.append(("start", unit.name))
        time.sleep(self.slow.get(unit.name, 0.01))
        if unit.name == self.fail:
            raise RuntimeError(f"{unit.name} failed")
        with self._events_lock:
            self.events.append(("end", unit.name))


def test_a_follower_starts_only_after_its_leader_ended(tmp_path):
    units = [WorkUnit(n, [], []) for n in ("layer_0", "layer_1", "layer_2", "layer_3")]
    key = {"layer_0": "a", "layer_1": "b", "layer_2": "a", "layer_3": "b"}
    sched = _RecordingScheduler(tmp_path, slow={"layer_0": 0.3, "layer_1": 0.05})
    sched.run(units, lambda u: "fp", jobs=3, key_of=lambda u: key[u.name])
    order = sched.events
    assert order.index(("start", "layer_2")) > order.index(("end", "layer_0"))
    assert order.index(("start", "layer_3")) > order.index(("end", "layer_1"))
    # without the constraint the free third thread would have started layer_2 while layer_0 slept
    assert len({name for kind, name in order if kind == "end"}) == 4


def test_a_failed_leader_stops_its_followers_and_the_error_is_raised(tmp_path):
    units = [WorkUnit(n, [], []) for n in ("layer_0", "layer_1", "layer_2")]
    sched = _RecordingScheduler(tmp_path, slow={}, fail="layer_0")
    with pytest.raises(RuntimeError, match="layer_0 failed"):
        sched.run(units, lambda u: "fp", jobs=2, key_of=lambda u: "same")
    assert ("start", "layer_1") not in sched.events and ("start", "layer_2") not in sched.events


# -- committer -------------------------------------------------------------------------------------
class _Built:
    def __init__(self, spec, data: bytes):
        import onnx
        from onnx import helper

        self.spec = spec
        graph = helper.make_graph([], "g", [], [], initializer=[
            helper.make_tensor("w", onnx.TensorProto.UINT8, [len(data)], data, raw=True)])
        self.model = helper.make_model(graph)
        self.weights = []

    def restored(self):
        return self.model


def _entry(spec) -> SegmentEntry:
    return SegmentEntry(name=spec.name, kind=spec.kind, layer=spec.layer, file=spec.filename,
                        inputs=list(spec.inputs), outputs=list(spec.outputs))


def test_commit_moves_complete_files_and_records_them(tmp_path):
    spec = segment_specs(DIMS)[0]
    committer = Committer(tmp_path, _empty_manifest())
    writer = UnitWriter(tmp_path, WorkUnit("vocab", [spec], []))
    writer.add(_Built(spec, b"x" * 100))
    assert not (tmp_path / spec.filename).exists()  # staged, not yet under its final name
    committer.commit(writer, [_entry(spec)])
    assert (tmp_path / spec.filename).is_file()
    partial = json.loads((tmp_path / PARTIAL_NAME).read_text())
    assert [s["name"] for s in partial["segments"]] == [spec.name]
    assert not list(tmp_path.glob(".tpugraph-stage-*"))


def test_a_failed_commit_leaves_no_file_under_a_final_name_and_no_record(tmp_path, monkeypatch):
    specs = segment_specs(DIMS)
    committer = Committer(tmp_path, _empty_manifest())
    writer = UnitWriter(tmp_path, WorkUnit("layer_0", specs[3:5], []))
    for spec in specs[3:5]:
        writer.add(_Built(spec, b"y" * 50))

    import tpugraph.export.committer as committer_module

    real_replace = committer_module.os.replace

    def crash_on_second(src, dst):
        if Path(dst).name == specs[4].filename:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(committer_module.os, "replace", crash_on_second)
    with pytest.raises(OutputError, match="No space left"):
        committer.commit(writer, [_entry(s) for s in specs[3:5]])
    assert not (tmp_path / specs[4].filename).exists()
    assert not (tmp_path / PARTIAL_NAME).exists()  # the unit was not recorded: a rerun builds it again
    assert not list(tmp_path.glob(".tpugraph-stage-*"))  # the staging folder is gone


def test_a_discarded_unit_leaves_nothing(tmp_path):
    spec = segment_specs(DIMS)[0]
    writer = UnitWriter(tmp_path, WorkUnit("vocab", [spec], [], data_file="vocab.data"))
    writer.discard()
    assert list(tmp_path.iterdir()) == []


# -- module_signature ------------------------------------------------------------------------------
class _Layer(nn.Module):
    def __init__(self, width=4, window=None, layer_idx=0, freq=1.0):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.window = window
        self.layer_idx = layer_idx
        self.register_buffer("inv_freq", torch.full((2,), freq))


def test_module_signature_ignores_the_layer_index_and_the_weights():
    a, b = _Layer(layer_idx=0), _Layer(layer_idx=7)
    with torch.no_grad():
        b.proj.weight.add_(1.0)
    assert module_signature(a) == module_signature(b)


@pytest.mark.parametrize("other", [_Layer(width=8), _Layer(window=512), _Layer(freq=2.0)])
def test_module_signature_tells_structures_apart(other):
    assert module_signature(_Layer()) != module_signature(other)


def test_module_signature_of_meta_buffers_is_stable():
    with torch.device("meta"):
        a, b = _Layer(), _Layer(freq=3.0)
    assert module_signature(a) == module_signature(b)  # values unknown on meta: shapes and types decide
