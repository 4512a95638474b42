"""Measured perplexity per compile mode -> the cheapest mode whose increase over transformers' stays within a bound
(``compile --quantize auto --max-ppl-increase X``).

The candidates go from the fewest bits per weight to the most (W4 in groups of 128, W4 in groups of 64, W8, BF16);
each is compiled with the evaluation head and scored on the cmodel (tpugraph eval --bmodel) until one is within the
bound (a group size that does not divide the model's hidden size is skipped: tpu-mlir cannot group those matrices), so a W4 that is good enough costs one compile and one evaluation. The choice keeps every measurement it made:
the table says why the cheaper modes were passed over. ``choose_by_perplexity`` takes the measuring function as a
parameter: the real one compiles and runs the cmodel (``cmodel_measure``), a test hands it measured values.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from .weight_cost import WeightCost

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    quantize: str  # bf16, w8bf16, w4bf16, ... (options.QUANTIZE_MODES)
    q_group_size: int | None = None  # None: model_deploy's default (64, W8 too)

    @property
    def label(self) -> str:
        return self.quantize + (f" g{self.q_group_size}" if self.q_group_size else "")

    @property
    def bits_per_weight(self) -> float:
        """What a weight of the blocks costs in the bmodel (weight_cost.WeightCost: its integer plus its group's
        16-bit scale and 8-bit zero point; 16 for the float modes)."""
        return WeightCost(self.quantize, self.q_group_size).bits_per_weight


DEFAULT_CANDIDATES = (Candidate("w4bf16", 128), Candidate("w4bf16", 64), Candidate("w8bf16"), Candidate("bf16"))


@dataclass
class Measured:
    candidate: Candidate
    perplexity: float
    reference_perplexity: float  # transformers' on the same windows
    seconds: float = 0.0  # compile and evaluation
    bmodel_bytes: int | None = None  # what the mode really costs (a tpu-mlir fallback to BF16 shows here)

    @property
    def increase_percent(self) -> float:
        return 100.0 * (self.perplexity / self.reference_perplexity - 1.0)

    def to_json(self) -> dict:
        return {"quantize": self.candidate.quantize, "q_group_size": self.candidate.q_group_size,
                "bits_per_weight": self.candidate.bits_per_weight, "perplexity": self.perplexity,
                "reference_perplexity": self.reference_perplexity, "increase_percent": self.increase_percent,
                "seconds": self.seconds, "bmodel_bytes": self.bmodel_bytes}


@dataclass
class PerplexityChoice:
    max_increase_percent: float
    measured: list[Measured] = field(default_factory=list)  # in the order measured (cheapest first)
    chosen: Candidate | None = None  # None: no candidate was within the bound
    skipped: list[str] = field(default_factory=list)  # candidates not measured, and why

    def table(self) -> str:
        lines = [f"{'mode':<12} {'bits/weight':>11} {'bmodel':>9} {'perplexity':>11} {'transformers':>12} "
                 f"{'increase':>9}  within"]
        for m in self.measured:
            within = "yes" if m.increase_percent <= self.max_increase_percent else "no"
            size = f"{m.bmodel_bytes / 1e6:.0f} MB" if m.bmodel_bytes else "-"
            lines.append(f"{m.candidate.label:<12} {m.candidate.bits_per_weight:>11.3f} {size:>9} {m.perplexity:>11.4f} "
                         f"{m.reference_perplexity:>12.4f} {m.increase_percent:>+8.3f}%  {within}")
        return "\n".join(lines + [f"not measured: {note}" for note in self.skipped])

    def summary(self) -> str:
        if self.chosen is None:
            return (f"no mode keeps the perplexity within +{self.max_increase_percent:g}% of transformers' "
                    f"(measured: {', '.join(f'{m.candidate.label} {m.increase_percent:+.3f}%' for m in self.measured)})")
        picked = next(m for m in self.measured if m.candidate == self.chosen)
        cheaper = [m for m in self.measured if m.candidate != self.chosen]
        why = (f"; cheaper modes over it: {', '.join(f'{m.candidate.label} {m.increase_percent:+.3f}%' for m in cheaper)}"
               if cheaper else "; the cheapest candidate")
        return (f"picked {self.chosen.label} ({self.chosen.bits_per_weight:.3f} bits per weight): perplexity "
                f"{picked.increase_percent:+.3f}% of transformers' (<= +{self.max_increase_percent:g}%){why}")

    def compile_args(self) -> list[str]:
        if self.chosen is None:
            return []
        args = ["--quantize", self.chosen.quantize]
        return args + (["--q-group-size", str(self.chosen.q_group_size)] if self.chosen.q_group_size else [])

    def to_json(self) -> dict:
        return {"max_increase_percent": self.max_increase_percent,
                "chosen": None if self.chosen is None else {"quantize": self.chosen.quantize,
                                                            "q_group_size": self.chosen.q_group_size},
                "measured": [m.to_json() for m in self.measured], "summary": self.summary()}


MeasureFn = Callable[[Candidate], Measured]


def choose_by_perplexity(max_increase_percent: float, measure: MeasureFn,
                         candidates: tuple[Candidate, ...] = DEFAULT_CANDIDATES, measure_all: bool = False,
                         hidden_size: int | None = None) -> PerplexityChoice:
    """The cheapest candidate (fewest bits per weight) whose measured perplexity is within ``max_increase_percent``
    of transformers'. ``measure`` compiles and scores one candidate; candidates are measured cheapest first and
    the search stops at the first within the bound unless ``measure_all``. ``hidden_size``: the model's; a group
    size that does not divide it is not measured (the matrices reading the hidden state cannot be grouped by it:
    tpu-mlir leaves them in the float type, so the mode is neither what it says nor cheap)."""
    if not max_increase_percent >= 0:
        raise UsageError(f"must be a percentage >= 0 (got {max_increase_percent})", option="max_ppl_increase")
    if not candidates:
        raise UsageError("no candidate modes to measure")
    choice = PerplexityChoice(max_increase_percent)
    if hidden_size:
        for c in candidates:
            if c.q_group_size and hidden_size % c.q_group_size:
                choice.skipped.append(f"{c.label}: {c.q_group_size} does not divide the hidden size {hidden_size}")
        candidates = tuple(c for c in candidates if not (c.q_group_size and hidden_size % c.q_group_size))
    for candidate in sorted(candidates, key=lambda c: c.bits_per_weight):
        measured = measure(candidate)
        choice.measured.append(measured)
        log.info("%s: perplexity %.4f, %+.3f%% of transformers'", candidate.label, measured.perplexity,
                 measured.increase_percent)
        if choice.chosen is None and measured.increase_percent <= max_increase_percent:
            choice.chosen = candidate
            if not measure_all:
                break
    return choice


def cmodel_measure(out: str | Path, venv: str | Path | None = None, chip: str = "bm1684x", windows: int = 2,
                   text: str | Path | None = None, jobs: int = 0) -> MeasureFn:
    """The real measurement: compile OUT in the candidate's mode with the evaluation head (no checks), score the
    bmodel on the cmodel against transformers (tpugraph eval --bmodel; the built-in text unless ``text``), then
    delete the bmodel and its compile folder."""
    from ..proof.perplexity import evaluate
    from .options import CompileOptions
    from .runner import compile_segments

    out_dir = Path(out)

    def measure(candidate: Candidate) -> Measured:
        t0 = time.perf_counter()
        options = CompileOptions(chip=chip, quantize=candidate.quantize, q_group_size=candidate.q_group_size,
                                 check="none", eval_head=True)
        report = compile_segments(out_dir, venv, options, jobs=jobs)
        try:
            size = report.bmodel.stat().st_size
            scored = evaluate(out_dir, text=text, builtin=text is None, windows=windows, bmodel=report.bmodel,
                              tpu_mlir=venv)
        finally:
            report.bmodel.unlink(missing_ok=True)
            shutil.rmtree(out_dir / report.plan.work_dir, ignore_errors=True)
            (out_dir / report.plan.script_name).unlink(missing_ok=True)
        return Measured(candidate, scored.perplexity, scored.reference_perplexity, time.perf_counter() - t0, size)

    return measure
