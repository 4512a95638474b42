"""Which layers may take their bmodel from another layer's deploy (tpu_mlir_bmodel_reuse.py), and running that.

Per layer structure (the layers whose graph was reused from one template layer at export), F16/BF16 nets of the
same commands differ only in their coefficients, check code, name and build time. The name is a flatbuffers
string, so the layout of the whole description depends on its length rounded to 4 bytes ("block_7" and
"block_12" lay out differently): layers are grouped by that room. In each group the first two layers are
deployed for real (the template, and a prover whose derived bmodel must equal model_deploy's byte for byte but
for the build time); the others are derived in one tpu-mlir process. Whatever is not derived is deployed for
real afterwards.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .plan import Step, StepAction

log = logging.getLogger(__name__)

DRIVER = "tpu_mlir_bmodel_reuse.py"
MIN_LAYERS = 3  # layers of one structure and name room: two are deployed, the others derived
DERIVABLE_MODES = ("f16", "bf16")
RunTool = Callable[[list[str], Path, Path], int]  # (argv, cwd, log file) -> exit code


@dataclass(frozen=True)
class DeployReuse:
    template: str  # deployed for real; the others are written from its bmodel
    prover: str  # deployed for real; derived too, and compared
    targets: tuple[str, ...]  # derived when the proof holds


def name_room(name: str) -> int:
    """Bytes a flatbuffers string of this name takes: the characters and their NUL, to a 4-byte boundary."""
    return (len(name.encode()) + 1 + 3) // 4 * 4


def plan_deploy_reuse(steps: list[Step], quantize: str, check: str) -> list[DeployReuse]:
    """One DeployReuse per layer structure and name room that has layers to derive, for the modes whose
    lowering is a rounding. Layers with a numerical compare (test data) are never derived: their deploy is the
    check. The MLIR template and its prover (runner.TransformReuse) always run in the first phase."""
    if quantize not in DERIVABLE_MODES or check == "all":
        return []
    structures: dict[str, list[str]] = {}
    checked = {s.segment for s in steps if s.action == StepAction.DEPLOY and s.checked}
    for s in steps:
        if s.action == StepAction.TRANSFORM and s.reuse_from:
            structures.setdefault(s.reuse_from, [s.reuse_from]).append(s.segment)
    plans = []
    for mlir_template, members in structures.items():
        rooms: dict[int, list[str]] = {}
        for m in members:
            rooms.setdefault(name_room(m), []).append(m)
        for group in rooms.values():
            if len(group) < MIN_LAYERS:
                continue
            template, prover = group[0], group[1]
            targets = tuple(m for m in group[2:] if m not in (mlir_template, members[1]) and m not in checked)
            if targets:
                plans.append(DeployReuse(template, prover, targets))
    return plans


def derive_deploys(reuse: DeployReuse, work: Path, mode: str, run: RunTool, driver: Path) -> tuple[list[str], str]:
    """Write the targets' bmodels from the template's (their transforms must be done). ``run(argv, cwd, log)``
    runs the driver with the tpu-mlir venv's python (argv[0] "python3") and returns its exit code. (derived names,
    why the others were not: '' when all were)."""
    spec = {
        "template": {"name": reuse.template, "dir": str(work / reuse.template), "mode": mode},
        "prove": {"name": reuse.prover, "dir": str(work / reuse.prover),
                  "weights": str(work / reuse.prover / f"{reuse.prover}_top_f32_all_weight.npz")},
        "targets": [{"name": t, "dir": str(work / t), "weights": str(work / t / f"{t}_top_f32_all_weight.npz")}
                    for t in reuse.targets],
    }
    spec_path = work / f"bmodel_reuse_{reuse.template}.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = work / f"bmodel_reuse_{reuse.template}.log"
    rc = run(["python3", str(driver), str(spec_path)], work, log_path)
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if rc != 0 or not lines:
        tail = text.strip().splitlines()[-1:] or ["no output"]
        return [], f"the derivation failed: {tail[0]}"
    result = json.loads(lines[-1])
    derived = list(result.get("derived", []))
    reason = result.get("reason", "")
    log.info("bmodel reuse from %s (proof on %s): %d of %d derived%s", reuse.template, reuse.prover, len(derived),
             len(reuse.targets), f"; {reason}" if reason else "")
    return derived, reason
