"""Manifest -> the tpu-mlir commands that compile every segment into one bmodel (as a bash script, or run here)."""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .compile_options import (CHIPS, DEFAULT_Q_GROUP_SIZE, HEAD_KINDS, IO_ALONE_KINDS, NUM_DEVICES, QUANT_INPUT_KINDS, QUANT_OUTPUT_KINDS, QUANTIZE_MODES, CompileOptions)  # noqa: F401 (re-exported)
from .errors import CompileError, UsageError
from .manifest import Manifest, SegmentEntry, read_manifest
from .toolchain import TOOLS, check_toolchain, default_tpu_mlir_venv, tool_environment  # noqa: F401

log = logging.getLogger(__name__)

OUT_VAR = "{OUT}"  # stands for the output folder in a Step's arguments: "$OUT" in the script, the real path here


@dataclass(frozen=True)
class Step:
    """One tool run: ``argv`` may contain OUT_VAR; ``cwd`` is relative to OUT."""

    segment: str  # "" for the combine step
    action: str  # transform | deploy | combine
    argv: tuple[str, ...]
    cwd: str
    checked: bool = False  # runs the tool's numerical compare


@dataclass
class CompilePlan:
    options: CompileOptions
    work_dir: str  # relative to OUT
    bmodel: str  # file name, written into OUT
    steps: list[Step]
    segments: list[str]
    command: str  # how to regenerate the script

    @property
    def script_name(self) -> str:
        return f"compile_{self.options.tag}.sh"


def bmodel_name(manifest: Manifest, options: CompileOptions) -> str:
    """`{model_type}_{quantize}_seq{SEQ}_{chip}_{N}dev.bmodel`, lowercase (LLM-TPU's naming plus the chip)."""
    model_type = str(manifest.model.get("model_type") or manifest.model.get("family") or "model")
    model_type = re.sub(r"[^a-z0-9.-]+", "-", model_type.lower()).strip("-") or "model"
    seq = int(manifest.options["seq_length"])
    return f"{model_type}_{options.quantize}_seq{seq}_{options.chip}_{options.num_device}dev.bmodel".lower()


def _float_mode(quantize: str) -> str:
    return "bf16" if quantize.endswith("bf16") else "f16"


def deploy_flags(kind: str, options: CompileOptions) -> list[str]:
    """model_deploy.py's quantization, device and I/O flags for one segment kind."""
    flags: list[str] = []
    if kind not in HEAD_KINDS:  # the heads: no --quantize, i.e. F32
        quantize = _float_mode(options.quantize) if kind.startswith("embedding") else options.quantize
        flags += ["--quantize", quantize.upper()]
        if quantize.startswith("w") and options.q_group_size:
            flags += ["--q_group_size", str(options.q_group_size)]
    flags += ["--chip", options.chip]
    # tpu-mlir 1.30.2's device-parallel pass aborts on F32 nets ("Not supported quantization mode"), so the
    # heads stay single-device nets, as in LLM-TPU's multi-device scripts; model_tool combines both kinds.
    if options.num_device > 1 and kind not in HEAD_KINDS:
        flags += ["--num_device", str(options.num_device)]
    if kind in QUANT_INPUT_KINDS:
        flags.append("--quant_input")
    if kind in QUANT_OUTPUT_KINDS:
        flags.append("--quant_output")
    if kind in IO_ALONE_KINDS:
        flags += ["--addr_mode", "io_alone"]
    return flags


def _test_input(out_dir: Path, entry: SegmentEntry) -> str | None:
    """The segment's test-data npz (relative to OUT) when the manifest notes one and it exists."""
    info = entry.extra.get("test_data")
    rel = info.get("file") if isinstance(info, dict) else info
    if rel and (out_dir / rel).is_file():
        return str(rel)
    return None


def plan_compile(out: str | Path, options: CompileOptions | None = None,
                 manifest: Manifest | None = None) -> CompilePlan:
    """Every tool run that compiles OUT's segments and combines them, in order. Deterministic for an OUT."""
    out_dir = Path(out)
    options = (options or CompileOptions()).check_options()
    manifest = manifest or read_manifest(out_dir)
    if not manifest.complete:
        raise UsageError(f"{out_dir}/manifest.json is marked incomplete: finish the export first")
    if not manifest.segments:
        raise UsageError(f"{out_dir}/manifest.json lists no segments")
    work = f"compile/{options.tag}"
    steps: list[Step] = []
    for entry in manifest.segments:
        name = entry.name
        cwd = f"{work}/{name}"
        test_input = _test_input(out_dir, entry) if options.check else None
        transform = ["model_transform.py", "--model_name", name, "--model_def", f"{OUT_VAR}/{entry.file}",
                     "--mlir", f"{name}.mlir"]
        deploy = ["model_deploy.py", "--mlir", f"{name}.mlir", *deploy_flags(entry.kind, options),
                  "--model", f"{name}.bmodel"]
        if test_input:
            transform += ["--test_input", f"{OUT_VAR}/{test_input}", "--test_result", f"{name}_top_outputs.npz"]
            deploy += ["--test_input", f"{OUT_VAR}/{test_input}", "--test_reference", f"{name}_top_outputs.npz"]
        steps.append(Step(name, "transform", tuple(transform), cwd, checked=bool(test_input)))
        steps.append(Step(name, "deploy", tuple(deploy), cwd, checked=bool(test_input)))
    bmodel = bmodel_name(manifest, options)
    combine = ["model_tool", "--combine", *(f"{s.name}/{s.name}.bmodel" for s in manifest.segments),
               "-o", f"{OUT_VAR}/{bmodel}"]
    steps.append(Step("", "combine", tuple(combine), work))
    command = f"tpugraph compile-script OUT --chip {options.chip} --quantize {options.quantize}"
    if options.q_group_size and options.q_group_size != DEFAULT_Q_GROUP_SIZE:
        command += f" --q-group-size {options.q_group_size}"
    if options.num_device != 1:
        command += f" --num-device {options.num_device}"
    if not options.check:
        command += " --no-check"
    return CompilePlan(options=options, work_dir=work, bmodel=bmodel, steps=steps,
                       segments=[s.name for s in manifest.segments], command=command)


def _shell_word(arg: str) -> str:
    if arg.startswith(OUT_VAR):
        rest = arg[len(OUT_VAR):]
        return '"$OUT"' + (shlex.quote(rest) if rest else "")
    return shlex.quote(arg)


def _shell_command(argv: tuple[str, ...]) -> str:
    """One command, an option and its value per line."""
    lines = [_shell_word(argv[0])]
    i = 1
    while i < len(argv):
        word = _shell_word(argv[i])
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            word += " " + _shell_word(argv[i + 1])
            i += 1
        lines.append(word)
        i += 1
    return " \\\n    ".join(lines)


def render_script(plan: CompilePlan, manifest: Manifest) -> str:
    """The plan as a self-contained bash script that lives in OUT (paths relative to its own folder)."""
    m = manifest.model
    opts = plan.options
    checked = sum(1 for s in plan.steps if s.action == "transform" and s.checked)
    lines = [
        "#!/usr/bin/env bash",
        f"# Compile the segments of this tpugraph output into {plan.bmodel} with tpu-mlir.",
        f"# Written by tpugraph {__version__}; regenerate with: {plan.command}",
        f"# Model: {m.get('architecture', '?')} ({m.get('model_type', '?')}), {m.get('num_layers', '?')} layers, "
        f"SEQ {manifest.options.get('seq_length')}; chip {opts.chip}, {opts.quantize}"
        + (f" (group {opts.q_group_size})" if opts.q_group_size else "") + f", {opts.num_device} device(s).",
        f"# Numerical checks: {checked} of {len(plan.segments)} segments have test data "
        "(tpugraph export-and-optimize --with-test-data).",
        "# Needs tpu-mlir 1.30 on PATH: source \"$(scripts/setup_tpu_mlir.sh)/bin/activate\" in the tpugraph repo.",
        "# Usage: bash SCRIPT [OUT]   (OUT defaults to the script's own folder)",
        "set -euo pipefail",
        'OUT="$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")}" && pwd)"',
        f"WORK=\"$OUT/{plan.work_dir}\"",
        "for tool in " + " ".join(TOOLS) + "; do",
        '    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is not on PATH: activate the tpu-mlir venv '
        '(scripts/setup_tpu_mlir.sh)" >&2; exit 1; }',
        "done",
    ]
    current = None
    for step in plan.steps:
        if step.segment != current:
            current = step.segment
            lines.append("")
            if step.action == "combine":
                lines.append("# All nets into one bmodel; the runtime finds them by name.")
                lines.append('cd "$WORK"')
            else:
                lines.append(f"# {step.segment}")
                lines.append(f'mkdir -p "$WORK/{step.segment}" && cd "$WORK/{step.segment}"')
        lines.append(_shell_command(step.argv))
    lines += ["", f'echo "wrote $OUT/{plan.bmodel}"', ""]
    return "\n".join(lines)


def write_compile_script(out: str | Path, options: CompileOptions | None = None,
                         path: str | Path | None = None) -> Path:
    """Write the compile script (default OUT/compile_<quantize>_<chip>_<N>dev.sh) and return its path.

    The script compiles the OUT it is given as its argument, else the folder it lies in."""
    out_dir = Path(out)
    manifest = read_manifest(out_dir)
    plan = plan_compile(out_dir, options, manifest)
    target = Path(path) if path else out_dir / plan.script_name
    text = render_script(plan, manifest)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------- running it


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

    @property
    def passed(self) -> bool:
        return self.bmodel is not None and all(r.transform_ok and r.deploy_ok for r in self.results)

    def table(self) -> str:
        return format_table(self.results)

    def to_json(self) -> dict:
        return {"passed": self.passed, "bmodel": str(self.bmodel) if self.bmodel else None,
                "seconds": round(self.seconds, 2), "options": self.plan.options.__dict__,
                "segments": [r.to_json() for r in self.results]}


def format_table(results: list[SegmentCompileResult]) -> str:
    def ok(v: bool | None) -> str:
        return "-" if v is None else ("ok" if v else "FAILED")

    rows = [f"{'segment':<22} {'transform':<9} {'min similarity':>14} {'deploy':<7} {'seconds':>8}"]
    for r in results:
        sim = "unchecked" if not r.checked else ("-" if r.min_similarity is None else f"{r.min_similarity:.6f}")
        rows.append(f"{r.segment:<22} {ok(r.transform_ok):<9} {sim:>14} {ok(r.deploy_ok):<7} {r.seconds:>8.1f}")
    return "\n".join(rows)


class SegmentCompileError(CompileError):
    """A tool failed on one segment; carries its log and the results up to there."""

    def __init__(self, segment: str, action: str, reason: str, log_tail: str, log_path: Path,
                 report: CompileReport | None = None):
        self.segment, self.action, self.reason = segment, action, reason
        self.log_tail, self.log_path, self.report = log_tail, log_path, report
        where = f"segment '{segment}'" if segment else "combining the bmodels"
        tool = {"transform": "model_transform.py", "deploy": "model_deploy.py",
                "combine": "model_tool --combine"}[action]
        super().__init__(f"tpu-mlir failed on {where} ({tool}): {reason}\n"
                         f"--- {tool}'s output, last lines (full log: {log_path}) ---\n{log_tail}")


ProgressFn = Callable[[str, str, int, int], None]

_SIMILARITY = re.compile(r"min_similarity\s*=\s*\(\s*([-+0-9.eE]+|nan|inf)")
_SIMILARITY_ALL = re.compile(r"min_similarity\s*=\s*\(\s*([-+0-9.eE]+|nan|inf)\s*,\s*([-+0-9.eE]+|nan|inf)")
_REASON = re.compile(r"(Error|error:|Exception|Unsupport|not support|FAILED|Failed|failed|Assertion|Abort|GLIBC)")
_NOISE = re.compile(r"^\s*(compare |\d+%\||\[Running\]|\[Success\])")


def parse_min_cosine(text: str) -> float | None:
    """The smallest cosine similarity of npz_tool's compares in a tool's output (None when nothing compared)."""
    values = [float(m.group(1)) for m in _SIMILARITY.finditer(text)]
    return min(values) if values else None


_COMPARE_FAILED = re.compile(r"npz_tool\.py compare (\S+) (\S+) --tolerance (\S+)")
_FAILED_TENSOR = re.compile(r"^\[\s*(\S+?)\s*\]\s+\S+\s+\[FAILED\]", re.M)


def failure_reason(text: str) -> str:
    """What went wrong, in the tool's own words: a failed numerical compare with its numbers and tensors,
    else the tool's last error line, else its last non-empty line."""
    if "npz compare FAILED" in text:
        end = text.rindex("npz compare FAILED")
        start = text.rfind("npz_tool.py compare", 0, end)  # the [Running] line of the failing compare
        block = text[max(start, 0):end]
        sims = _SIMILARITY_ALL.findall(block)
        tensors = list(dict.fromkeys(_FAILED_TENSOR.findall(block)))
        cmd = _COMPARE_FAILED.search(text, max(start, 0))
        parts = []
        if sims:
            parts.append(f"min similarity cosine {float(sims[-1][0]):.6f}, euclid {float(sims[-1][1]):.6f}")
        if cmd:
            parts.append(f"{cmd.group(1)} vs {cmd.group(2)}, tolerance (cosine, euclid) {cmd.group(3)}")
        failed = f"; failed tensors: {', '.join(tensors)}" if tensors else ""
        return f"numerical compare FAILED ({'; '.join(parts)}){failed}"
    crash = text.find("PLEASE submit a bug report")
    if crash >= 0:  # an LLVM tool (tpuc-opt) aborted: its message is just above the crash banner
        before = [ln.strip() for ln in text[:crash].splitlines() if ln.strip() and not _NOISE.match(ln)]
        return "compiler crashed: " + " / ".join(before[-2:])[:500]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _NOISE.match(ln)]
    for line in reversed(lines):
        if _REASON.search(line) and "[Success]" not in line:
            return line[:500]
    return lines[-1][:500] if lines else "no output"


def _run_step(step: Step, out_dir: Path, env: dict[str, str]) -> tuple[int, str, Path]:
    cwd = out_dir / step.cwd
    cwd.mkdir(parents=True, exist_ok=True)
    argv = [a.replace(OUT_VAR, str(out_dir), 1) if a.startswith(OUT_VAR) else a for a in step.argv]
    argv[0] = str(Path(env["VIRTUAL_ENV"]) / "bin" / argv[0])
    log_path = cwd / f"{step.action}.log"
    log.debug("running %s in %s", " ".join(argv), cwd)
    with open(log_path, "w") as fh:
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc.returncode, log_path.read_text(errors="replace"), log_path


def _tail(text: str, lines: int = 25) -> str:
    """The end of a tool's output without progress bars and Python traceback frames (kept: the exception)."""
    kept: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        if not line.strip() or _NOISE.match(line):
            continue
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
            continue
        if in_traceback and line.startswith((" ", "\t")):
            continue
        in_traceback = False
        kept.append(line)
    return "\n".join(kept[-lines:])


def _expected_output(step: Step, out_dir: Path) -> Path:
    """The file a step must leave behind: the .mlir, the .bmodel, the combined bmodel."""
    flag = {"transform": "--mlir", "deploy": "--model", "combine": "-o"}[step.action]
    value = step.argv[step.argv.index(flag) + 1]
    if value.startswith(OUT_VAR):
        return Path(value.replace(OUT_VAR, str(out_dir), 1))
    return out_dir / step.cwd / value


@dataclass
class _Failure:
    step: Step
    reason: str
    tail: str
    log_path: Path


def _run_steps(steps: list[Step], first_index: int, total: int, out_dir: Path, env: dict[str, str],
               result: SegmentCompileResult | None, progress: ProgressFn | None) -> _Failure | None:
    """Run one segment's steps (or the combine) in order; the first failure ends them."""
    for offset, step in enumerate(steps):
        if progress:
            progress(step.segment, step.action, first_index + offset, total)
        t0 = time.perf_counter()
        rc, text, log_path = _run_step(step, out_dir, env)
        elapsed = time.perf_counter() - t0
        ok = rc == 0
        if result is not None:
            result.seconds += elapsed
            similarity = parse_min_cosine(text) if step.checked else None
            if step.action == "transform":
                result.transform_ok, result.transform_similarity = ok, similarity
            else:
                result.deploy_ok, result.deploy_similarity = ok, similarity
        output = _expected_output(step, out_dir)
        if ok and not output.is_file():
            ok, text = False, text + f"\n{step.argv[0]} exited 0 but wrote no {output.name}"
        log.info("%s %s: %s (%.1fs)", step.segment or "all", step.action, "ok" if ok else "FAILED", elapsed)
        if not ok:
            reason = failure_reason(text)
            if "GLIBC_" in text:
                reason += (" (the tpu-mlir venv lacks the glibc workaround: run "
                           f"scripts/setup_tpu_mlir.sh '' {env['VIRTUAL_ENV']})")
            return _Failure(step, reason, _tail(text), log_path)
    return None


def compile_segments(out: str | Path, venv: str | Path | None = None, options: CompileOptions | None = None,
                     progress: ProgressFn | None = None, jobs: int = 1) -> CompileReport:
    """Run the compile plan of OUT with the tpu-mlir in VENV (default_tpu_mlir_venv() when None): transform +
    deploy each segment, then combine. ``jobs`` segments compile at once (each tool is mostly one core).

    Stops at the first failing tool (with jobs > 1: lets the running segments finish, starts no other) with a
    SegmentCompileError that names the segment and quotes the tool. Writes the plan's script into OUT too,
    so what ran can be rerun by hand.
    """
    from concurrent.futures import ThreadPoolExecutor

    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1 (got {jobs})")
    out_dir = Path(out).resolve()
    venv = check_toolchain(venv)
    manifest = read_manifest(out_dir)
    plan = plan_compile(out_dir, options, manifest)
    script = out_dir / plan.script_name
    script.write_text(render_script(plan, manifest))
    script.chmod(0o755)
    env = tool_environment(venv)
    kinds = {s.name: s.kind for s in manifest.segments}
    total = len(plan.steps)
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
    stop = False

    def run_group(i: int) -> None:
        nonlocal stop
        if stop:
            return
        started[i] = True
        first, steps = groups[i]
        failures[i] = _run_steps(steps, first, total, out_dir, env, results[i], progress)
        if failures[i] is not None:
            stop = True

    if jobs == 1:
        for i in range(len(groups)):
            run_group(i)
            if stop:
                break
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(run_group, range(len(groups))))
    report.results = [r for r, ran in zip(results, started) if ran]
    failure = next((f for f in failures if f is not None), None)
    if failure is None:
        failure = _run_steps([plan.steps[-1]], total - 1, total, out_dir, env, None, progress)
    report.seconds = time.perf_counter() - t_start
    if failure is not None:
        raise SegmentCompileError(failure.step.segment, failure.step.action, failure.reason, failure.tail,
                                  failure.log_path, report)
    report.bmodel = out_dir / plan.bmodel
    if progress:
        progress("", "done", total, total)
    return report
