"""A deployed layer's bmodel -> the same net for another layer of the same graph, by writing that layer's weights
into a copy of it. Run by the tpu-mlir venv's Python (imports nothing of tpugraph).

    python tpu_mlir_bmodel_reuse.py SPEC.json     (prints one JSON line: what was derived, or why not)

Layers whose ONNX graph is another layer's with other weights (weight swapping at export) compile to the same
commands at the same addresses: model_deploy's output for them differs from the template layer's only in the
coefficient bytes (the lowered weights), the coefficients' sha256 ``check_code``, the net name and the build time.
So for F16/BF16 nets, where lowering a weight is a rounding of each float (checked on the template for every
weight), the bmodel of layer i is the template's file with layer i's lowered weights placed where the template's
are, its check code and its name. Every step is checked, not assumed:

* the template's coefficients are rebuilt from its own lowered weights and addresses: must equal its coeff bytes;
* each of the template's lowered weights must equal the rounding of its float weight, else that weight must be
  the same in the target layer (a layer-independent constant) and keeps the template's bytes;
* SPEC's ``prove`` layer was deployed for real: its derived file must equal model_deploy's byte for byte, but for
  the build time. Only when that holds are the ``targets`` derived; the caller deploys them for real otherwise.

SPEC: {"template": {"name", "dir", "mode"}, "prove": {"name", "dir", "weights"}, "targets": [{"name", "dir",
"weights"}]}; ``weights`` is the layer's ``*_top_f32_all_weight.npz`` (the template's keys, mlir_reuse).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys

import numpy as np

SUFFIX = {"bf16": "_bf16", "f16": "_f16"}
_WEIGHT = re.compile(r'"top\.Weight"\(\).*?-> tensor<[^,>]*, (\d+) : i64> loc\(#(loc\d+)\)')
_LOC = re.compile(r'^#(loc\d+) = loc\("([^"]*)"\)', re.M)


class NotDerivable(Exception):
    pass


def lower(x: np.ndarray, mode: str) -> np.ndarray:
    """tpu-mlir's F16/BF16 weight lowering: round to nearest even (as uint16 bit patterns)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if mode == "f16":
        with np.errstate(over="ignore"):  # beyond f16's range: inf, as the cast on the chip's side
            return x.astype(np.float16).view(np.uint16)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


class Template:
    """A deployed net: its file, the coefficients' place in it, and its lowered weights by address."""

    def __init__(self, name: str, folder: str, mode: str):
        from tpu_mlir.python.debugger import bmodel_fbs
        from tpu_mlir.python.debugger.disassembler import bmodel_header_type

        if mode not in SUFFIX:
            raise NotDerivable(f"{mode}: only F16/BF16 weights are derived (a rounding); others are deployed")
        self.name, self.mode = name, mode
        path = os.path.join(folder, f"{name}.bmodel")
        self.data = bytearray(open(path, "rb").read())
        head = np.frombuffer(bytes(self.data[:bmodel_header_type.itemsize]), dtype=bmodel_header_type)
        self.fb_start = bmodel_header_type.itemsize
        self.fb_end = self.fb_start + int(head["flatbuffers_size"][0])
        model = bmodel_fbs.Model.GetRootAsModel(bytes(self.data[self.fb_start:self.fb_end]), 0)
        if model.NetLength() != 1 or model.Net(0).ParameterLength() != 1:
            raise NotDerivable("not a one-net, one-stage bmodel")
        net = model.Net(0)
        if net.Name().decode() != name:
            raise NotDerivable(f"net is named {net.Name().decode()}, not {name}")
        coeff = net.Parameter(0).CoeffMem()
        self.base = coeff.Address()
        self.coeff_at = self.fb_end + coeff.BinaryCoeff().Start()
        self.coeff_size = coeff.BinaryCoeff().Size()
        self.check_code = bytes(coeff.CheckCodeAsNumpy().tobytes())
        self.time = model.Time()
        if hashlib.sha256(self.coeff()).digest() != self.check_code:
            raise NotDerivable("the check code is not the sha256 of the coefficients")
        final = os.path.join(folder, f"{name}_bm1684x_{mode}_final.mlir")
        lowered = os.path.join(folder, f"{name}_tpu_addressed_bm1684x_{mode}_weight.npz")
        if not os.path.isfile(final):  # the chip is part of the file name
            finals = [f for f in os.listdir(folder) if f.startswith(name + "_") and f.endswith(f"_{mode}_final.mlir")]
            if len(finals) != 1:
                raise NotDerivable("no final MLIR beside the bmodel")
            final = os.path.join(folder, finals[0])
            lowered = final.replace("_final.mlir", "_weight.npz").replace(f"{name}_", f"{name}_tpu_addressed_", 1)
        text = open(final).read()
        locs = dict(_LOC.findall(text))
        self.address = {locs[loc]: int(addr) for addr, loc in _WEIGHT.findall(text)}
        with np.load(lowered) as npz:
            self.lowered = {k: npz[k] for k in npz.files}
        missing = set(self.address) - set(self.lowered)
        if missing:
            raise NotDerivable(f"addressed weights without data: {sorted(missing)[:3]}")
        with np.load(os.path.join(folder, f"{name}_top_f32_all_weight.npz")) as npz:
            self.floats = {k: npz[k] for k in npz.files}
        if self.build(self.lowered) != self.coeff():
            raise NotDerivable("the template's coefficients are not its lowered weights at their addresses")
        suffix = SUFFIX[mode]
        # lowered key -> the float key its name carries (its own key when none), and the float key it is a
        # rounding of (None: a constant of the lowering, which a target must have the same as the template)
        self.float_key = {key: key[:-len(suffix)] if key.endswith(suffix) else key for key in self.lowered}
        self.source: dict[str, str | None] = {}
        for key, value in self.lowered.items():
            src = self.float_key[key] if key.endswith(suffix) else None
            f = self.floats.get(src) if src else None
            if f is not None and f.size == value.size and value.dtype == np.uint16 and np.array_equal(
                    lower(f, mode).ravel(), value.ravel()):
                self.source[key] = src
            else:
                self.source[key] = None

    def coeff(self) -> bytes:
        return bytes(self.data[self.coeff_at:self.coeff_at + self.coeff_size])

    def build(self, lowered: dict[str, np.ndarray]) -> bytes:
        out = bytearray(self.coeff_size)
        for key, addr in self.address.items():
            raw = np.ascontiguousarray(lowered[key]).tobytes()
            at = addr - self.base
            if at < 0 or at + len(raw) > self.coeff_size:
                raise NotDerivable(f"{key} lies outside the coefficients")
            out[at:at + len(raw)] = raw
        return bytes(out)

    def derive(self, target: str, weights: str) -> bytes:
        """The bytes of TARGET's bmodel, from its float weights (the template's keys)."""
        with np.load(weights) as npz:
            floats = {k: npz[k] for k in npz.files}
        lowered = {}
        for key, value in self.lowered.items():
            src = self.source[key]
            if src is None:
                # not a rounding of one float weight: only a weight equal to the template's may keep its bytes
                base = self.float_key[key]
                if base in floats and base in self.floats and not np.array_equal(floats[base], self.floats[base]):
                    raise NotDerivable(f"{key} differs from the template's and is not a plain rounding")
                lowered[key] = value
                continue
            f = floats.get(src)
            if f is None or f.size != value.size:
                raise NotDerivable(f"{target} has no weight {src} of the template's size")
            lowered[key] = lower(f, self.mode).reshape(value.shape)
        coeff = self.build(lowered)
        data = bytearray(self.data)
        data[self.coeff_at:self.coeff_at + self.coeff_size] = coeff
        _replace_once(data, self.fb_start, self.fb_end, self.check_code, hashlib.sha256(coeff).digest())
        _rename(data, self.fb_start, self.fb_end, self.name, target)
        return bytes(data)


def _replace_once(data: bytearray, start: int, end: int, old: bytes, new: bytes) -> None:
    at = data.find(old, start, end)
    if at < 0 or data.find(old, at + 1, end) >= 0 or len(old) != len(new):
        raise NotDerivable("the check code is not found once in the bmodel's description")
    data[at:at + len(old)] = new


def _rename(data: bytearray, start: int, end: int, old: str, new: str) -> None:
    """A flatbuffers string in place: [u32 length][bytes][NUL][padding]; a name fits in the template's room."""
    needle = struct.pack("<I", len(old)) + old.encode() + b"\0"
    at = data.find(needle, start, end)
    if at < 0 or data.find(needle, at + 1, end) >= 0:
        raise NotDerivable(f"the net name {old} is not found once in the bmodel's description")
    room = (len(old) + 1 + 3) // 4 * 4  # the string's bytes with its NUL, to the next 4-byte boundary
    if len(new) + 1 > room:
        raise NotDerivable(f"the name {new} does not fit in the room of {old}")
    data[at:at + 4 + room] = struct.pack("<I", len(new)) + new.encode().ljust(room, b"\0")


def _same_but_time(a: bytes, b: bytes, time: bytes) -> bool:
    if len(a) != len(b):
        return False
    if a == b:
        return True
    at = a.find(time)
    if at < 0:
        return False
    return a[:at] == b[:at] and a[at + len(time):] == b[at + len(time):]


def run(spec: dict) -> dict:
    t = spec["template"]
    try:
        template = Template(t["name"], t["dir"], t["mode"])
        prove = spec["prove"]
        derived = template.derive(prove["name"], prove["weights"])
        real = open(os.path.join(prove["dir"], f"{prove['name']}.bmodel"), "rb").read()
        if not _same_but_time(derived, real, template.time):
            return {"proven": False, "reason": f"{prove['name']} derived differs from model_deploy's", "derived": []}
    except (NotDerivable, OSError, KeyError) as exc:
        return {"proven": False, "reason": str(exc), "derived": []}
    done = []
    for target in spec["targets"]:
        try:
            data = template.derive(target["name"], target["weights"])
        except (NotDerivable, OSError) as exc:
            return {"proven": True, "reason": f"{target['name']}: {exc}", "derived": done}
        os.makedirs(target["dir"], exist_ok=True)
        path = os.path.join(target["dir"], f"{target['name']}.bmodel")
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        done.append(target["name"])
    return {"proven": True, "reason": "", "derived": done}


def main() -> None:
    import tpu_mlir  # noqa: F401  (sets the library paths the debugger's modules need)

    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    print(json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main()
