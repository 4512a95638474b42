"""What a compile did: per segment (tool results, the compares' cosine, seconds), the bmodel, the end-to-end check."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CompileError
from .plan import CompilePlan, StepAction


@dataclass
class SegmentCompileResult:
    segment: str
    kind: str
    transform_ok: bool | None = None  # None: not run (yet)
    deploy_ok: bool | None = None
    checked: bool = False
    transform_similarity: float | None = None  # min cosine of model_transform's compare (onnxruntime vs MLIR)
    deploy_similarity: float | None = None  # min cosine of model_deploy's compares (quantized MLIR, cmodel)
    seconds: float = 0.0
    deploy_derived: str = ""  # the layer whose bmodel this one's was written from (bmodel_reuse), "" if deployed

    @property
    def min_similarity(self) -> float | None:
        values = [v for v in (self.transform_similarity, self.deploy_similarity) if v is not None]
        return min(values) if values else None

    def to_json(self) -> dict:
        return {**self.__dict__, "min_similarity": self.min_similarity}


@dataclass
class CompileReport:
    plan: CompilePlan
    results: list[SegmentCompileResult] = field(default_factory=list)
    bmodel: Path | None = None
    seconds: float = 0.0
    end_to_end: object | None = None  # verify.VerifyReport of the combined bmodel (check mode representative)
    end_to_end_seconds: float = 0.0
    transforms_derived: list[str] = field(default_factory=list)  # layers whose MLIR came from their template's
    deploys_derived: list[str] = field(default_factory=list)  # layers whose bmodel came from another layer's
    deploy_reuse_notes: list[str] = field(default_factory=list)  # why some layers were deployed after all
    embedding_table: Path | None = None  # --embedding-disk: embedding.bin written beside the bmodel
    memory: object | None = None  # memory_plan.MemoryPlan checked before the tools ran (None: no source config)
    device_splits: list = field(default_factory=list)  # --num-device N > 1: device_split.SegmentSplit per segment
    device_proof: object | None = None  # --num-device N > 1: device_nets.DeviceNetsReport (the end-to-end check's place)

    @property
    def passed(self) -> bool:
        segments_ok = self.bmodel is not None and all(r.transform_ok and r.deploy_ok for r in self.results)
        splits_ok = all(s.well_formed or not s.split for s in self.device_splits)  # a malformed one runs nowhere
        return (segments_ok and splits_ok and (self.end_to_end is None or self.end_to_end.passed)
                and (self.device_proof is None or self.device_proof.passed))

    def table(self) -> str:
        return format_table(self.results)

    def to_json(self) -> dict:
        return {"passed": self.passed, "bmodel": str(self.bmodel) if self.bmodel else None,
                "seconds": round(self.seconds, 2), "options": self.plan.options.__dict__,
                "segments": [r.to_json() for r in self.results],
                "end_to_end": self.end_to_end.to_json() if self.end_to_end is not None else None,
                "end_to_end_seconds": round(self.end_to_end_seconds, 2),
                "memory": self.memory.to_json() if self.memory is not None else None,
                "embedding_table": str(self.embedding_table) if self.embedding_table else None,
                "transforms_derived": self.transforms_derived, "deploys_derived": self.deploys_derived,
                "deploy_reuse_notes": self.deploy_reuse_notes, "vocab_sharing": self.vocab_sharing,
                "tensor_parallel": self.plan.tensor_parallel_note or None,
                "device_splits": [s.to_json() for s in self.device_splits] or None,
                "device_proof": self.device_proof.to_json() if self.device_proof is not None else None}

    @property
    def vocab_sharing(self) -> str:
        """How the combined bmodel holds a tied vocabulary matrix (vocab_sharing.py)."""
        sharing = self.plan.vocab_sharing
        if sharing:
            return (f"stored once: {sharing.lm_head} shares the embedding's coefficients; the final norm is in "
                    f"{', '.join(sharing.last_layer)}")
        return f"not shared: {self.plan.vocab_sharing_note}" if self.plan.vocab_sharing_note else "not shared"


def format_table(results: list[SegmentCompileResult]) -> str:
    def ok(v: bool | None) -> str:
        return "-" if v is None else ("ok" if v else "FAILED")

    rows = [f"{'segment':<22} {'transform':<9} {'min similarity':>14} {'deploy':<7} {'seconds':>8}"]
    for r in results:
        sim = "unchecked" if not r.checked else ("-" if r.min_similarity is None else f"{r.min_similarity:.6f}")
        deploy = "derived" if r.deploy_derived else ok(r.deploy_ok)
        rows.append(f"{r.segment:<22} {ok(r.transform_ok):<9} {sim:>14} {deploy:<7} {r.seconds:>8.1f}")
    return "\n".join(rows)


class SegmentCompileError(CompileError):
    """A tool failed on one segment; carries its log and the results up to there."""

    def __init__(self, segment: str, action: StepAction, reason: str, log_tail: str, log_path: Path,
                 report: CompileReport | None = None):
        self.segment, self.action, self.reason = segment, action, reason
        self.log_tail, self.log_path, self.report = log_tail, log_path, report
        where = f"segment '{segment}'" if segment else "combining the bmodels"
        tool = {StepAction.TRANSFORM: "model_transform.py", StepAction.DEPLOY: "model_deploy.py",
                StepAction.COMBINE: "model_tool --combine"}[action]
        super().__init__(f"tpu-mlir failed on {where} ({tool}): {reason}\n"
                         f"--- {tool}'s output, last lines (full log: {log_path}) ---\n{log_tail}")
