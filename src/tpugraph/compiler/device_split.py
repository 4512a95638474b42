"""A multi-device bmodel's model_tool listings -> per segment, whether tpu-mlir's device-parallel pass split it.

Measured from the combined bmodel, not assumed from the plan (docs/explanation/tensor-parallel.md):

- ``model_tool --info --all`` lists every per-device net with its ``device id``. tpu-mlir names a net it did not
  split ``<segment>_<device>`` (one whole copy per device) and the nets of a split segment
  ``<segment>_<step>_<device>`` (the device shards of each step, the all-reduce steps between them); the cascade
  net ``<segment>`` lists the inputs the runtime feeds, per device.
- ``model_tool --weight`` lists each net's weight ranges: their sizes summed per device are what each device holds.

A split is *well formed* when the cascade net takes nothing but the segment's own inputs: tpu-mlir 1.30.2 leaves the
original attention alive when a decode block's MLP residual was folded into an unsplit down projection's bias,
and its tensors then show up as extra cascade inputs no runtime can feed (measured on tiny-llama).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

_NET = re.compile(r"^net(?: \d+)?: \[(?P<name>[^\]]+)\]\s+(?P<kind>\w+)")
_DEVICE = re.compile(r"^device id: (\d+)")
_INPUT = re.compile(r"^(input|output): (?:devid\((\d+)\) )?([^,]+),")
_WEIGHT_NET = re.compile(r'^net \d+ : "(?P<name>[^"]+)"')
_RANGE = re.compile(r"\[0x([0-9a-f]+), 0x([0-9a-f]+)\)")


@dataclass
class NetInfo:
    name: str
    kind: str  # static | dynamic | cascade
    device: int | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    weight_bytes: int = 0


def parse_info(text: str) -> dict[str, NetInfo]:
    """``model_tool --info --all``: every net, its device and its input and output names (a cascade net's without
    devid)."""
    nets: dict[str, NetInfo] = {}
    current: NetInfo | None = None
    for line in text.splitlines():
        m = _NET.match(line)
        if m:
            current = nets.setdefault(m["name"], NetInfo(m["name"], m["kind"]))
            continue
        if current is None:
            continue
        d = _DEVICE.match(line)
        if d:
            current.device = int(d.group(1))
        i = _INPUT.match(line)
        if i:
            names = current.inputs if i.group(1) == "input" else current.outputs
            if i.group(3).strip() not in names:  # a cascade net lists each device's copy: its name once
                names.append(i.group(3).strip())
    return nets


def add_weights(nets: dict[str, NetInfo], text: str) -> None:
    """``model_tool --weight``: each net's weight ranges, summed into its ``weight_bytes``."""
    current: NetInfo | None = None
    for line in text.splitlines():
        m = _WEIGHT_NET.match(line)
        if m:
            current = nets.get(m["name"])
            continue
        r = _RANGE.search(line)
        if current is not None and r:
            current.weight_bytes += int(r.group(2), 16) - int(r.group(1), 16)


@dataclass(frozen=True)
class SegmentSplit:
    segment: str
    num_device: int
    steps: int  # device steps tpu-mlir made of the segment: 1 = not split (a whole copy per device)
    device_weight_bytes: tuple[int, ...]  # what each device holds of the segment's weights
    unexpected_inputs: tuple[str, ...]  # cascade inputs that are not the segment's own (a malformed split)

    @property
    def split(self) -> bool:
        return self.steps > 1

    @property
    def well_formed(self) -> bool:
        return self.split and not self.unexpected_inputs

    def line(self) -> str:
        per = "/".join(_mib(b) for b in self.device_weight_bytes)
        if not self.split:
            return f"{self.segment}: not split, each device holds all its weights ({per} MiB)"
        how = "split" if self.well_formed else ("split but malformed (its cascade net also takes "
                                                  + ", ".join(self.unexpected_inputs[:3])
                                                  + (", ..." if len(self.unexpected_inputs) > 3 else "") + ")")
        return f"{self.segment}: {how} in {self.steps} steps, weights per device {per} MiB"

    def to_json(self) -> dict:
        return {"segment": self.segment, "split": self.split, "well_formed": self.well_formed, "steps": self.steps,
                "device_weight_bytes": list(self.device_weight_bytes),
                "unexpected_inputs": list(self.unexpected_inputs)}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def segment_splits(nets: dict[str, NetInfo], segments: dict[str, list[str]], num_device: int) -> list[SegmentSplit]:
    """Per segment (name -> its input names), how the per-device nets of ``nets`` hold it."""
    result = []
    for seg, own_inputs in segments.items():
        pattern = re.compile(re.escape(seg) + r"_(?:(\d+)_)?(\d+)")
        steps: set[str] = set()
        parts = []
        for n in nets.values():
            m = pattern.fullmatch(n.name)
            if m and n.kind != "cascade" and n.device is not None:
                parts.append(n)
                steps.add(m.group(1) or "")
        if not parts:
            continue
        per_device = [0] * num_device
        for n in parts:
            if n.device < num_device:
                per_device[n.device] += n.weight_bytes
        cascade = nets.get(seg)
        # a device's share of an input tpu-mlir slices (the KV history) is named <input>_<device>
        unexpected = tuple(i for i in (cascade.inputs if cascade else [])
                           if i not in own_inputs and re.sub(r"_\d+$", "", i) not in own_inputs)
        result.append(SegmentSplit(seg, num_device, len(steps), tuple(per_device), unexpected))
    return result


def segment_parts(nets: dict[str, NetInfo], segment: str) -> dict[int, list[NetInfo]]:
    """A split segment's per-device nets by step (``<segment>_<step>_<device>``), each step's in device order."""
    pattern = re.compile(re.escape(segment) + r"_(\d+)_(\d+)")
    steps: dict[int, list[tuple[int, NetInfo]]] = {}
    for n in nets.values():
        m = pattern.fullmatch(n.name)
        if m and n.kind != "cascade":
            steps.setdefault(int(m.group(1)), []).append((int(m.group(2)), n))
    return {k: [n for _, n in sorted(v, key=lambda t: t[0])] for k, v in sorted(steps.items())}


def model_tool_nets(bmodel: Path, env: dict[str, str]) -> dict[str, NetInfo]:
    """``bmodel``'s nets as model_tool lists them (run in the tpu-mlir environment ``env``), with their weights."""
    def listing(*args: str) -> str:
        return subprocess.run(["model_tool", *args], env=env, capture_output=True, text=True, check=True).stdout

    nets = parse_info(listing("--info", str(bmodel), "--all"))
    add_weights(nets, listing("--weight", str(bmodel)))
    return nets


def measure_splits(bmodel: Path, env: dict[str, str], manifest, num_device: int) -> list[SegmentSplit]:
    """Run model_tool (in the tpu-mlir environment ``env``) on ``bmodel`` and read its split per segment of
    ``manifest``."""
    segments = {s.name: [t.name for t in s.inputs] for s in manifest.segments}
    return segment_splits(model_tool_nets(bmodel, env), segments, num_device)
