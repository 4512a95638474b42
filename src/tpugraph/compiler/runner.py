"""Run a CompilePlan here: the tools as subprocesses (segments as tasks of the shared task runner,
tpugraph.scheduling, in ``jobs`` threads), then the combine, then the end-to-end check of the combined bmodel that
the check mode asks for."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..contract.manifest import read_manifest
from ..contract.segments import SegmentKind
from ..errors import UsageError
from ..scheduling import LocalExecutor, Task, make_executor, run_tasks
from ..tpu_mlir.guest import guest_script
from ..tpu_mlir.logs import failure_reason, log_tail, parse_min_cosine
from ..tpu_mlir.toolchain import check_toolchain, tool_environment
from ..tpu_mlir.worker import ToolWorker
from .bmodel_reuse import DRIVER, derive_deploys, plan_deploy_reuse
from .memory_plan import check_fits, output_memory_or_none
from .options import CompileOptions
from .plan import OUT_VAR, Step, StepAction, plan_compile
from .progress import ProgressFn, StepCounter
from .report import CompileReport, SegmentCompileError, SegmentCompileResult
from .script import save_script

log = logging.getLogger(__name__)

END_TO_END_PROMPT = 4  # tokens of the end-to-end check's random prompt
END_TO_END_TOKENS = 3  # greedy tokens it compares (each is a full decode step on the cmodel)
# a V x H matrix each: the longest transforms
VOCABULARY_KINDS = (SegmentKind.EMBEDDING, SegmentKind.EMBEDDING_CACHE, SegmentKind.LM_HEAD)


def run_step(step: Step, out_dir: Path, env: dict[str, str],
             worker: ToolWorker | None = None, executor=None) -> tuple[int, str, Path]:
    """One tool run in its folder; its output goes to ``<action>.log`` there. (return code, output, log path)
    With a worker, the Python tools it serves run in its forked children; anything else, or everything once the
    worker is gone, as a subprocess."""
    cwd = out_dir / step.cwd
    cwd.mkdir(parents=True, exist_ok=True)
    argv = [a.replace(OUT_VAR, str(out_dir), 1) if a.startswith(OUT_VAR) else a for a in step.argv]
    log_path = cwd / f"{step.action}.log"
    rc = run_tool(argv, cwd, log_path, env, worker, executor)
    return rc, log_path.read_text(errors="replace"), log_path


def run_tool(argv: list[str], cwd: Path, log_path: Path, env: dict[str, str], worker: ToolWorker | None = None,
             executor=None) -> int:
    """A tool of the tpu-mlir venv (argv[0] a name in its bin/) in ``cwd``, its output in ``log_path``; its exit
    code. By the worker when it serves that tool, else (or once the worker is gone) as a subprocess, which the
    executor (scheduling.make_executor; None: here) runs where it runs its calls."""
    log.debug("running %s in %s", " ".join(argv), cwd)
    rc = worker.run(argv, cwd, log_path) if worker is not None and worker.serves(argv) else None
    if rc is None:
        rc = (executor or LocalExecutor()).call(tool_subprocess, list(argv), str(cwd), str(log_path), dict(env))
    return rc


def tool_subprocess(argv: list[str], cwd: str, log_path: str, env: dict[str, str]) -> int:
    """The tool as a subprocess, its output in ``log_path``: what an executor runs (a picklable call)."""
    with open(log_path, "w") as fh:
        return subprocess.run([str(Path(env["VIRTUAL_ENV"]) / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=env,
                              stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


@dataclass
class _Failure:
    step: Step
    reason: str
    tail: str
    log_path: Path


class TransformReuse:
    """Which layers may take their transform output from their template's (mlir_reuse), shared by the workers.

    Per structure (template segment), the first layer reusing it is the prover: it runs model_transform for real
    and its output is compared with the derived one; the later layers derive only once that proof holds, else
    they run the tool too. Each wait also ends when the compile is stopping."""

    def __init__(self, steps: list[Step], files: dict[str, str], stop: threading.Event):
        self.files = files  # segment -> its ONNX file, relative to OUT
        self.stop = stop
        self.transformed = {s.segment: threading.Event() for s in steps if s.action == StepAction.TRANSFORM}
        self.prover: dict[str, str] = {}
        for s in steps:
            if s.action == StepAction.TRANSFORM and s.reuse_from:
                self.prover.setdefault(s.reuse_from, s.segment)
        self.proven = {template: threading.Event() for template in self.prover}
        self.holds: dict[str, bool] = {}
        self.lock = threading.Lock()
        self.derived: list[str] = []
        self.indexes: dict[str, object] = {}  # template -> mlir_reuse.TemplateIndex (None: its output is missing)

    def _wait(self, event: threading.Event) -> bool:
        while not event.wait(0.2):
            if self.stop.is_set():
                return False
        return True

    def _derive(self, step: Step, out_dir: Path, into: Path) -> bool:
        from .mlir_reuse import TemplateIndex

        template = step.reuse_from
        with self.lock:  # each template's output is read once, by the first layer that needs it
            if template not in self.indexes:
                self.indexes[template] = TemplateIndex.read(template, out_dir / Path(step.cwd).parent / template,
                                                            out_dir / self.files[template])
            index = self.indexes[template]
        return index is not None and index.derive(step.segment, into, out_dir / self.files[step.segment])

    def try_derive(self, step: Step, out_dir: Path) -> bool:
        """For a non-prover layer: True when its output was derived (the tool need not run)."""
        template = step.reuse_from
        if not template or self.prover.get(template) == step.segment:
            return False
        if not self._wait(self.transformed[template]) or not self._wait(self.proven[template]):
            return False
        if not self.holds.get(template) or not self._derive(step, out_dir, out_dir / step.cwd):
            return False
        with self.lock:
            self.derived.append(step.segment)
        return True

    def after_tool(self, step: Step, ok: bool, out_dir: Path) -> None:
        """After model_transform ran for real: release the waiters; a prover checks the derivation."""
        from .mlir_reuse import same_output

        template = step.reuse_from
        try:
            if ok and template and self.prover.get(template) == step.segment and self._wait(self.transformed[template]):
                derived = out_dir / step.cwd / "derived"
                holds = self._derive(step, out_dir, derived) and same_output(out_dir / step.cwd, derived, step.segment)
                self.holds[template] = holds
                log.info("transform reuse for the layers of %s: %s", template,
                         "proven on " + step.segment if holds else f"NOT equal on {step.segment}: each runs the tool")
        finally:
            self.transformed[step.segment].set()
            if template and self.prover.get(template) == step.segment:
                self.proven[template].set()

    def release(self, step: Step) -> None:
        """A step that ended without after_tool (derived, or failed before): never leave a waiter hanging."""
        self.transformed[step.segment].set()
        if step.reuse_from and self.prover.get(step.reuse_from) == step.segment:
            self.proven[step.reuse_from].set()


def _run_steps(steps: list[Step], out_dir: Path, env: dict[str, str], result: SegmentCompileResult | None,
               counter: StepCounter, reuse: TransformReuse | None = None,
               worker: ToolWorker | None = None, executor=None) -> _Failure | None:
    """Run one segment's steps (or the combine) in order; the first failure ends them."""
    for step in steps:
        counter.start(step.segment, step.action)
        t0 = time.perf_counter()
        if step.action == StepAction.TRANSFORM and reuse is not None and reuse.try_derive(step, out_dir):
            rc, text, log_path = 0, "derived from the transform of " + step.reuse_from, out_dir / step.cwd
            reuse.release(step)
        else:
            rc, text, log_path = run_step(step, out_dir, env, worker, executor)
            if step.action == StepAction.TRANSFORM and reuse is not None:
                reuse.after_tool(step, rc == 0, out_dir)
        elapsed = time.perf_counter() - t0
        ok = rc == 0
        if result is not None:
            result.seconds += elapsed
            similarity = parse_min_cosine(text) if step.checked else None
            if step.action == StepAction.TRANSFORM:
                result.transform_ok, result.transform_similarity = ok, similarity
            else:
                result.deploy_ok, result.deploy_similarity = ok, similarity
        output = step.output_path(out_dir)
        if ok and not output.is_file():
            ok, text = False, text + f"\n{step.argv[0]} exited 0 but wrote no {output.name}"
        log.info("%s %s: %s (%.1fs)", step.segment or "all", step.action, "ok" if ok else "FAILED", elapsed)
        counter.finish(step.segment, step.action, elapsed, ok)
        if not ok:
            reason = failure_reason(text)
            if "GLIBC_" in text:
                reason += (" (the tpu-mlir venv lacks the glibc workaround: run "
                           f"scripts/setup_tpu_mlir.sh '' {env['VIRTUAL_ENV']})")
            return _Failure(step, reason, log_tail(text), log_path)
    return None


def compile_segments(out: str | Path, venv: str | Path | None = None, options: CompileOptions | None = None,
                     progress: ProgressFn | None = None, jobs: int = 1, tool_worker: bool = True,
                     executor: str = "local", ray_address: str | None = None) -> CompileReport:
    """Run the compile plan of OUT with the tpu-mlir in VENV (default_tpu_mlir_venv() when None): transform +
    deploy each segment, then combine. ``jobs`` segments compile at once (each tool is mostly one core; 0: as
    many as llm_convert.py runs, max(cores, 4)).
    Check mode ``representative`` then runs verify --bmodel for a few tokens (CompileReport.end_to_end).

    With ``tool_worker`` (the default) tpu-mlir's Python tools run in the children of one fork server
    (tpu_mlir/worker.py) that imported them once, instead of a fresh interpreter each; the outputs are the same.

    Stops at the first failing tool (with jobs > 1: lets the running segments finish, starts no other) with a
    SegmentCompileError that names the segment and quotes the tool. Writes the plan's script into OUT too,
    so what ran can be rerun by hand.
    ``progress`` gets a StepEvent when each step starts and ends, counted over every step and the end-to-end check.

    ``executor``: where the tools run (scheduling.EXECUTORS): ``local`` here; ``ray`` as Ray tasks on the cluster at
    ``ray_address`` (else the one this process is connected to, else a local one started for the compile), the
    same plan in the same order, with as many segments at once as the cluster has CPUs when ``jobs`` is 0.
    """
    if jobs < 0:
        raise UsageError(f"jobs must be >= 0 (got {jobs}; 0: max(cores, 4))")
    from ..scheduling import EXECUTORS

    if executor not in EXECUTORS:
        raise UsageError(f"executor must be one of {', '.join(EXECUTORS)} (got '{executor}')")
    if ray_address and executor != "ray":
        raise UsageError("--ray-address applies to --executor ray")
    out_dir = Path(out).resolve()
    manifest = read_manifest(out_dir)  # the user's own arguments first (and whether the model fits), then the toolchain
    plan = plan_compile(out_dir, options, manifest)
    memory, why = output_memory_or_none(out_dir, manifest, plan.options)
    if memory is None:
        log.warning("no memory plan: %s", why)
    else:
        check_fits(memory)
    venv = check_toolchain(venv)
    runner = make_executor(executor, ray_address)
    try:
        if jobs == 0:
            import os

            jobs = runner.cpus if runner.name == "ray" else max(os.cpu_count() or 1, 4)
        save_script(plan, manifest, out_dir / plan.script_name)
        env = tool_environment(venv)
        (out_dir / plan.work_dir).mkdir(parents=True, exist_ok=True)
        # the fork server serves this machine's tools: with Ray every tool is a Ray task
        server = (ToolWorker(venv, env, log_path=out_dir / plan.work_dir / "worker.log")
                  if tool_worker and runner.name == "local" else nullcontext())
        with server as worker:  # the worker (None without one) ends with the compile, however it ends
            report = _compile(out_dir, venv, manifest, plan, env, progress, jobs, worker, runner)
    finally:
        runner.close()
    report.memory = memory
    return report


def preview_compile(out: str | Path, options: CompileOptions | None = None):
    """compile --dry-run: the compile plan and the memory plan (None and why when the source's config cannot be
    read), without the toolchain and without running anything."""
    out_dir = Path(out).resolve()
    manifest = read_manifest(out_dir)
    plan = plan_compile(out_dir, options, manifest)
    memory, why = output_memory_or_none(out_dir, manifest, plan.options)
    return plan, memory, why


def _compile(out_dir: Path, venv: Path, manifest, plan, env: dict[str, str], progress: ProgressFn | None, jobs: int,
             worker: ToolWorker | None, executor) -> CompileReport:
    kinds = {s.name: s.kind for s in manifest.segments}
    if plan.eval_head:  # compile --eval-head: an lm_head over every position, not a segment of OUT
        kinds[plan.eval_head] = SegmentKind.LM_HEAD
    counter = StepCounter(progress, len(plan.steps) + (1 if plan.end_to_end else 0))
    report = CompileReport(plan=plan)
    t_start = time.perf_counter()

    # the plan's steps grouped by segment, in order, with the index of each group's first step
    groups: list[tuple[int, list[Step]]] = []
    for index, step in enumerate(plan.steps[:-1]):
        if groups and groups[-1][1][0].segment == step.segment:
            groups[-1][1].append(step)
        else:
            groups.append((index, [step]))
    results = [SegmentCompileResult(steps[0].segment, kinds[steps[0].segment], checked=steps[0].checked)
               for _, steps in groups]
    failures: list[_Failure | None] = [None] * len(groups)
    started = [False] * len(groups)
    stop = threading.Event()  # set by the first failing segment; every worker reads it before starting one
    reuse = TransformReuse(plan.steps, {s.name: s.file for s in manifest.segments}, stop)

    def run_group(i: int) -> None:
        first, steps = groups[i]
        try:
            if stop.is_set():
                return
            started[i] = True
            failures[i] = _run_steps(steps, out_dir, env, results[i], counter, reuse, worker, executor)
            if failures[i] is not None:
                stop.set()
        finally:
            reuse.release(steps[0])

    # Layers whose bmodel can be written from another layer's deploy wait for the first phase (which deploys
    # their templates and provers); then their transforms run (derived: cheap), the derivation, and the deploys
    # of whatever was not derived.

    deploy_reuse = plan_deploy_reuse(plan.steps, plan.options.quantize, plan.options.check)
    deferred = {t for r in deploy_reuse for t in r.targets}
    index_of = {steps[0].segment: i for i, (_, steps) in enumerate(groups)}

    def run_part(i: int, action: StepAction) -> None:
        first, steps = groups[i]
        part = [(first + k, s) for k, s in enumerate(steps) if s.action == action]
        if stop.is_set() or not part:
            return
        started[i] = True
        failure = _run_steps([s for _, s in part], out_dir, env, results[i], counter, reuse, worker, executor)
        if failure is not None:
            failures[i] = failure
            stop.set()

    # One task per first-phase segment, the longest first (the nets of the vocabulary matrix, then the plan's
    # order); then, for the layers whose deploys may be derived, their transforms, one derivation per structure
    # and name room, and the deploys of whatever was not derived, each phase after the one before.
    first = sorted((i for i in range(len(groups)) if groups[i][1][0].segment not in deferred),
                   key=lambda i: kinds[groups[i][1][0].segment] not in VOCABULARY_KINDS)
    tasks = [Task(f"segment:{i}", partial(run_group, i)) for i in first]
    late = [index_of[t] for r in deploy_reuse for t in r.targets]
    phase1 = tuple(t.name for t in tasks)
    tasks += [Task(f"transform:{i}", partial(run_part, i, StepAction.TRANSFORM), phase1) for i in late]
    late_transforms = tuple(f"transform:{i}" for i in late)
    driver = guest_script(DRIVER)
    derived_by: dict[int, bool] = {}
    outcomes: dict[int, tuple[list[str], str]] = {}  # derivation -> (segments derived, why not all)

    def derive(k: int, r) -> None:
        t0 = time.perf_counter()
        derived, why = derive_deploys(r, out_dir / plan.work_dir, plan.options.quantize,
                                      lambda argv, cwd, path: run_tool(argv, cwd, path, env, worker, executor),
                                      driver)
        share = (time.perf_counter() - t0) / max(1, len(r.targets))
        for name in r.targets:
            i = index_of[name]
            derived_by[i] = name in derived
            if name in derived:
                results[i].deploy_ok, results[i].deploy_derived = True, r.template
                results[i].seconds += share
                counter.finish(name, "deploy (derived from " + r.template + ")", share)
        outcomes[k] = (derived, why)

    derivations = [Task(f"derive:{k}", partial(derive, k, r), late_transforms) for k, r in enumerate(deploy_reuse)]
    tasks += derivations
    every_derivation = tuple(t.name for t in derivations)
    tasks += [Task(f"deploy:{i}", partial(lambda i: None if derived_by.get(i) else run_part(i, StepAction.DEPLOY), i),
                   every_derivation) for i in late]
    try:
        run_tasks(tasks, jobs, stop, thread_name_prefix="compile")
    finally:
        for i in range(len(groups)):
            if groups[i][1][0].segment in deferred:
                reuse.release(groups[i][1][0])
    for k, r in enumerate(deploy_reuse):  # in the plan's order, whatever order the derivations ended in
        if k in outcomes:
            derived, why = outcomes[k]
            report.deploys_derived += [name for name in r.targets if name in derived]
            if why:
                report.deploy_reuse_notes.append(f"{r.template}: {why}")
    report.results = [r for r, ran in zip(results, started) if ran]
    report.transforms_derived = sorted(reuse.derived)
    failure = next((f for f in failures if f is not None), None)
    if failure is None:
        failure = _run_steps([plan.steps[-1]], out_dir, env, None, counter, executor=executor)
    report.seconds = time.perf_counter() - t_start
    if failure is not None:
        raise SegmentCompileError(failure.step.segment, failure.step.action, failure.reason, failure.tail,
                                  failure.log_path, report)
    report.bmodel = out_dir / plan.bmodel
    if plan.options.num_device > 1:  # what tpu-mlir made of each segment over the devices, read from the bmodel
        from .device_split import measure_splits

        report.device_splits = measure_splits(report.bmodel, env, manifest, plan.options.num_device)
    if manifest.conventions.embedding_disk:  # --embedding-disk: the rows in the compile's float type
        from ..contract.embedding_table import COMPILED_NAME, write_compiled
        from .plan import _float_mode

        report.embedding_table = write_compiled(out_dir, _float_mode(plan.options.quantize), out_dir / COMPILED_NAME)
    if plan.end_to_end and plan.options.num_device > 1:  # the cmodel cannot launch a cascade net (device_nets.py)
        from ..proof.device_nets import prove_splits

        counter.start("", "per-device check")
        report.device_proof, report.end_to_end_seconds = prove_splits(report.device_splits, out_dir, report.bmodel,
                                                                      plan.options.num_device, venv)
        counter.finish("", "per-device check", report.end_to_end_seconds,
                       getattr(report.device_proof, "passed", True))
        report.seconds = time.perf_counter() - t_start
    elif plan.end_to_end:
        from ..proof.verify import verify

        counter.start("", "end-to-end check")
        t0 = time.perf_counter()
        report.end_to_end = verify(out_dir, prompt_length=END_TO_END_PROMPT, new_tokens=END_TO_END_TOKENS,
                                   bmodel=report.bmodel, tpu_mlir=venv, mask_check=False)  # verify --bmodel does it
        report.end_to_end_seconds = time.perf_counter() - t0
        counter.finish("", "end-to-end check", report.end_to_end_seconds, report.end_to_end.passed)
        report.seconds = time.perf_counter() - t_start
    return report
