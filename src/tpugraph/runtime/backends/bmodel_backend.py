"""A combined bmodel on tpu-mlir's cmodel chip simulator, through bmodel_driver.py run by the tpu-mlir venv."""

from __future__ import annotations

import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...contract.manifest import Manifest
from ...errors import UsageError, VerificationError
from ...tpu_mlir.guest import guest_script, wire
from ...tpu_mlir.toolchain import check_toolchain, tool_environment

log = logging.getLogger(__name__)

DRIVER = guest_script("bmodel_driver.py")


@dataclass(frozen=True)
class NetInfo:
    inputs: list[dict]  # {"name", "dtype" (f32, f16, bf16, i32...), "shape"}
    outputs: list[dict]
    dynamic: bool = False  # compiled --dynamic: runs at shapes up to its own (forward_dynamic)


class BmodelBackend:
    """Starts the driver, checks the bmodel's nets against OUT's manifest, then runs nets on request."""

    def __init__(self, bmodel: str | Path, manifest: Manifest, venv: str | Path | None = None, check: bool = True):
        self.bmodel = Path(bmodel).expanduser().resolve()
        if not self.bmodel.is_file():
            raise UsageError(f"bmodel '{bmodel}' does not exist (compile OUT first: tpugraph compile OUT)")
        self.venv = check_toolchain(venv)
        if not (self.venv / "bin" / "python").is_file():
            raise UsageError(f"the tpu-mlir venv '{self.venv}' has no bin/python to run the bmodel driver with: "
                             "recreate it with scripts/setup_tpu_mlir.sh")
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([str(self.venv / "bin" / "python"), str(DRIVER), str(self.bmodel)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      env=tool_environment(self.venv))
        try:
            reply, _ = self._request({"op": "nets"}, what=f"load {self.bmodel.name}")
            self.chip = str(reply["chip"]).lower()
            self.nets = {name: NetInfo(n["inputs"], n["outputs"], bool(n.get("dynamic")))
                         for name, n in reply["nets"].items()}
            if check:  # (a multi-device bmodel's cascade nets hold per-device shapes: proof/device_nets.py)
                check_against_manifest(self.nets, manifest, self.bmodel)
        except BaseException:
            self.close()
            raise
        self.name = f"bmodel on the cmodel ({self.chip}{', dynamic prefill' if self.dynamic_prefill else ''})"

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else "no output"

    def _request(self, header: dict, arrays=(), what: str = "") -> tuple[dict, list[np.ndarray]]:
        try:
            wire.write_message(self._proc.stdin, header, arrays)
            reply, outputs = wire.read_message(self._proc.stdout)
        except (EOFError, BrokenPipeError, OSError):
            code = self._proc.wait()
            raise UsageError(f"the bmodel driver stopped (exit {code}) while it tried to {what}: "
                             f"{self._stderr_tail()}") from None
        if "error" in reply:
            raise UsageError(f"cannot {what} on the cmodel: {reply['error']}")
        return reply, outputs

    def run(self, net: str, *arrays: np.ndarray, dynamic: bool = False) -> list[np.ndarray]:
        """Run ``net``; with ``dynamic`` the arrays may be smaller than its shapes (a net compiled --dynamic). A
        net the bmodel marks dynamic given smaller arrays runs at their shapes without asking."""
        info = self.nets[net]
        feeds = []
        for spec, arr in zip(info.inputs, arrays, strict=True):
            arr = np.asarray(arr)
            feeds.append(arr.astype(np.int32) if arr.dtype.kind in "iu" else arr.astype(np.float32))
            dynamic = dynamic or (info.dynamic and tuple(arr.shape) != tuple(spec["shape"]))
        header = {"op": "run", "net": net, **({"dynamic": True} if dynamic else {})}
        _, outputs = self._request(header, feeds, what=f"run net {net} of {self.bmodel.name}")
        return outputs

    def run_part(self, net: str, *arrays: np.ndarray) -> list[np.ndarray]:
        """Run a net the bmodel holds but does not list (a device's part ``<segment>_<step>_<device>`` of a
        multi-device bmodel); floats go as float32, integers as int32, as ``run`` sends them."""
        feeds = [a.astype(np.int32) if a.dtype.kind in "iu" else a.astype(np.float32) for a in map(np.asarray, arrays)]
        _, outputs = self._request({"op": "run", "net": net}, feeds, what=f"run net {net} of {self.bmodel.name}")
        return outputs

    def embedding_table(self, out_dir: Path, manifest: Manifest):
        """--embedding-disk: embedding.bin beside the bmodel (compile wrote it in the blocks' float type),
        checked against OUT's float32 rows."""
        from ...contract.embedding_table import COMPILED_NAME, EmbeddingTable

        reference = EmbeddingTable.of_output(out_dir, manifest)
        float_type = self.activation_dtype if self.activation_dtype in ("f16", "bf16") else "f16"
        table = EmbeddingTable(self.bmodel.parent / COMPILED_NAME, reference.vocab, reference.hidden, float_type)
        table.check_matches(reference)
        return table

    @property
    def dynamic_prefill(self) -> bool:
        """The prefill nets were compiled --dynamic (compile --dynamic): the runtime runs them at the prompt's
        length (LLM-TPU's chat.cpp reads the same flag from block_0)."""
        block = self.nets.get("block_0")
        return bool(block and block.dynamic)

    @property
    def activation_dtype(self) -> str:
        """The float type the blocks exchange (f16 or bf16; f32 when uncompressed)."""
        block = self.nets.get("block_0")
        return block.inputs[0]["dtype"] if block else "f32"

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                wire.write_message(proc.stdin, {"op": "quit"})
                proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                proc.kill()
                proc.wait()
        self._proc = None
        self._stderr.close()

    def __del__(self):
        self.close()


def check_against_manifest(nets: dict[str, NetInfo], manifest: Manifest, bmodel: Path) -> None:
    """Every segment of the manifest is a net of the bmodel with the same input and output shapes."""
    missing = [s.name for s in manifest.segments if s.name not in nets]
    if missing == ["vit"]:  # the language model's nets without the vision encoder's
        raise VerificationError(f"{bmodel.name} has no vit net, which this vision-language output needs for an "
                                "image: compile OUT again (tpugraph compile OUT compiles its vit too)")
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise VerificationError(f"{bmodel.name} was not compiled from this output: it lacks the net(s) {shown} "
                                f"(it has {', '.join(list(nets)[:6])}{'...' if len(nets) > 6 else ''})")
    for seg in manifest.segments:
        net = nets[seg.name]
        for side, specs, tensors in (("input", seg.inputs, net.inputs), ("output", seg.outputs, net.outputs)):
            got = [tuple(t["shape"]) for t in tensors]
            want = [tuple(s.shape) for s in specs]
            if got != want:
                raise VerificationError(f"{bmodel.name} was not compiled from this output: net {seg.name} has "
                                        f"{side} shapes {got}, the manifest says {want}")
