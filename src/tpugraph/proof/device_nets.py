"""A multi-device bmodel's per-device nets -> run on the cmodel one at a time, chained like the cascade net, compared
with the whole block in onnxruntime (`verify OUT --num-device N --bmodel X`).

tpu-mlir's cmodel simulates one device and cannot launch a cascade net, but it runs each device's part of a split
segment by name (``<segment>_<step>_<device>``, device 1's on device 0 too). tpu-mlir cuts a split block into steps:
the device shards (attention, MLP) and, between them, the all-reduce steps, which are nets too (an Add of every
device's partial result). This proof feeds each step's nets from the tensors the earlier steps produced, by name,
as the cascade net connects them; each device's KV history input is its slice of the whole history (its KV heads).
What it does not cover: the transfers between devices (the runtime's), and segments tpu-mlir did not split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..contract.manifest import SegmentEntry, read_manifest
from ..contract.segments import MASK_VALUE
from ..errors import UsageError

HISTORY_INPUTS = ("history_k", "history_v")
MIN_COSINE = 0.99  # BF16/F16 nets against float32 onnxruntime (verify's tolerance for a block's hidden state)


@dataclass(frozen=True)
class PartCheck:
    segment: str
    output: str
    cosine: float
    max_abs_diff: float
    devices_agree: bool  # every device's copy of a reduced output (the hidden state) is the same

    @property
    def ok(self) -> bool:
        return self.cosine >= MIN_COSINE and self.devices_agree

    def to_json(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


@dataclass
class DeviceNetsReport:
    num_device: int
    checks: list[PartCheck] = field(default_factory=list)
    nets_run: list[str] = field(default_factory=list)
    unsplit: list[str] = field(default_factory=list)  # block segments tpu-mlir did not split (not checked here)
    mask: str = f"{MASK_VALUE:g}"  # the masked-position value the nets were fed

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict:
        return {"passed": self.passed, "num_device": self.num_device, "mask": self.mask, "nets_run": self.nets_run,
                "unsplit": self.unsplit, "checks": [c.to_json() for c in self.checks]}


def block_feeds(entry: SegmentEntry, seq: int, seed: int = 0, mask_value: float = MASK_VALUE) -> dict[str, np.ndarray]:
    """Inputs for a block segment: random states (and history), positions 0.. (prefill) or a decode step at
    position ``seq // 2`` with the history rows before it written, a causal mask writing ``mask_value``."""
    rng = np.random.default_rng(seed)
    decode = "history_k" in {t.name for t in entry.inputs}
    step = seq // 2
    feeds = {}
    for t in entry.inputs:
        if t.name == "position_ids":
            positions = np.full(t.shape[-1], step) if decode else np.arange(t.shape[-1])
            feeds[t.name] = positions.reshape(t.shape).astype(np.int32)
        elif t.name == "attention_mask":
            q, k = t.shape[-2:]
            if decode:
                mask = np.zeros((q, k), np.float32)
                mask[:, step:k - 1] = mask_value  # history rows not written yet; the new token's own column open
            else:
                mask = np.triu(np.full((q, k), mask_value, np.float32), 1)
            feeds[t.name] = mask.reshape(t.shape)
        else:
            feeds[t.name] = rng.standard_normal(t.shape).astype(np.float32)
    return feeds


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def verify_device_nets(out: str | Path, bmodel: str | Path, num_device: int, tpu_mlir: str | Path | None = None,
                       layers: list[int] | None = None, seed: int = 0, other_mask: bool = False) -> DeviceNetsReport:
    """Run every split block segment of ``bmodel`` (compiled for ``num_device`` devices) part by part on the cmodel
    and compare hidden state and KV outputs with OUT's block ONNX in onnxruntime (float32). ``other_mask``: the
    masked positions hold the other encoding a runtime writes (verify.other_mask_value, e.g. BF16's reading of
    0xF0E2, about -5.5e29) instead of MASK_VALUE: the split form hands the mask to tpu-mlir without a Clip."""
    import onnxruntime as ort

    from ..compiler.device_split import model_tool_nets, segment_parts
    from ..runtime.backends.bmodel_backend import BmodelBackend
    from ..tpu_mlir.toolchain import check_toolchain, tool_environment

    out_dir = Path(out)
    manifest = read_manifest(out_dir)
    if not Path(bmodel).is_file():
        raise UsageError(f"bmodel '{bmodel}' does not exist (compile OUT first: tpugraph compile OUT --num-device "
                         f"{num_device})")
    venv = check_toolchain(tpu_mlir)
    nets = model_tool_nets(Path(bmodel), tool_environment(venv))
    blocks = [s for s in manifest.segments if s.kind.value in ("block", "block_cache")
              and (layers is None or s.layer in layers)]
    report = DeviceNetsReport(num_device)
    backend = BmodelBackend(bmodel, manifest, venv, check=False)
    try:
        mask_value = MASK_VALUE
        if other_mask:
            from .verify import other_mask_value

            pattern, mask_value = other_mask_value(backend.activation_dtype)
            report.mask = f"{pattern} ({mask_value:.3g})"
        for entry in blocks:
            parts = segment_parts(nets, entry.name)
            if not parts:
                report.unsplit.append(entry.name)
                continue
            if any(len(step) not in (1, num_device) for step in parts.values()):
                raise UsageError(f"{entry.name}'s parts in the bmodel do not match {num_device} devices",
                                 option="num_device")
            feeds = block_feeds(entry, int(manifest.options.seq_length), seed, mask_value)
            values = dict(feeds)
            for name in HISTORY_INPUTS:  # each device's KV heads of the history: tpu-mlir's contiguous slices
                if name in feeds:
                    for d, share in enumerate(np.array_split(feeds[name], num_device, axis=2)):
                        values[f"{name}_{d}"] = share
            for step in parts.values():
                for net in step:
                    missing = [i for i in net.inputs if i not in values]
                    if missing:
                        raise UsageError(f"{net.name} takes {', '.join(missing)}, which no earlier part makes: "
                                         "tpu-mlir's split of this segment is malformed (compile report)")
                    outputs = backend.run_part(net.name, *(values[i] for i in net.inputs))
                    values.update(zip(net.outputs, outputs))
                    report.nets_run.append(net.name)
            session = ort.InferenceSession(str(out_dir / entry.file), providers=["CPUExecutionProvider"])
            reference = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
            cascade = nets.get(entry.name)
            for t, expected in zip(entry.outputs, reference):
                # the cascade's outputs of this segment output, one per device (hidden_states_..._<device>)
                names = [n for n in (cascade.outputs if cascade else []) if re.match(re.escape(t.name) + r"(_|$)", n)]
                got = [values[n] for n in names if n in values]
                if len(got) != num_device:
                    raise UsageError(f"{entry.name}: {len(got)} device copies of {t.name} came out of its parts, "
                                     f"not {num_device}", option="num_device")
                if t.name in HISTORY_INPUTS or t.name.startswith("past_"):  # each device its KV heads
                    whole, agree = np.concatenate(got, axis=2), True  # [1, S, KV heads, D]
                else:  # the all-reduced hidden state, the same on every device
                    whole = got[0]
                    agree = all(np.array_equal(g, got[0]) for g in got[1:])
                whole = whole.reshape(expected.shape)
                report.checks.append(PartCheck(entry.name, t.name, _cosine(whole, expected),
                                               float(np.abs(whole - expected).max()), agree))
    finally:
        backend.close()
    return report


def prove_splits(splits: list, out: Path, bmodel: Path, num_device: int,
                 tpu_mlir: Path) -> tuple[DeviceNetsReport | None, float]:
    """compile --num-device N's check: the per-device proof when tpu-mlir's split of ``splits``
    (device_split.SegmentSplit) is well formed, None when nothing was split or a split is malformed (the compile
    report says which); and its seconds."""
    import time

    t0 = time.perf_counter()
    if not any(s.split for s in splits) or not all(s.well_formed or not s.split for s in splits):
        return None, time.perf_counter() - t0
    return verify_device_nets(out, bmodel, num_device, tpu_mlir), time.perf_counter() - t0
