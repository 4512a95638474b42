"""HF folder -> combined bmodel: tpu-mlir's own llm_convert.py vs tpugraph (export-and-optimize + compile), the
same model, quantization, chip and SEQ, side by side in one invocation.

    python scripts/bench_compile.py MODEL [--seq 128] [--quantize bf16] [--chip bm1684x] [--jobs 2]
                                          [--work DIR] [--tpu-mlir VENV] [--with-default-check]

Needs the tpu-mlir venv (scripts/setup_tpu_mlir.sh; llm_convert.py runs in it, activated) and GNU parallel on
PATH (llm_convert.py deploys with it). Prints one table: HF->bmodel seconds of both and their ratio; per net
kind the compiler's estimated time on the chip (``runtime: X ms`` of compiler_profile_0.txt, written beside
each deployed net) of both and the ratio; the combined bmodel's size of both. Each run starts from an empty
folder. ``--with-default-check`` also times tpugraph's compile with its default check (compares on one
segment per structure + verify --bmodel of a few tokens on the cmodel), a separate row.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"embedding": r"embedding", "embedding_cache": r"embedding_cache", "block": r"block_\d+",
         "block_cache": r"block_cache_\d+", "lm_head": r"lm_head", "greedy_head": r"greedy_head"}
_RUNTIME = re.compile(r"runtime:\s*([0-9.]+)\s*ms")


def default_venv() -> Path:
    configured = os.environ.get("TPUGRAPH_TPU_MLIR_VENV")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tpugraph" / "tpu-mlir-venv"


def timed(argv: list[str], log: Path, env: dict | None = None, shell: bool = False) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(argv if not shell else argv[0], stdout=fh, stderr=subprocess.STDOUT, env=env,
                              shell=shell, executable="/bin/bash" if shell else None)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        sys.exit(f"error: {' '.join(argv)[:200]} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))
    return seconds


def half_precision_view(model: Path, view: Path) -> Path:
    """llm_convert.py refuses a checkpoint whose config says float32 ("Not support quantize type: torch.float32");
    scripts/make_smollm2.py writes float32 (the dequantized GGUF). Both tools then get the same folder of links
    to the same files with the config's dtype set to bfloat16 (SmolLM2's own); tpugraph reads the weights in
    float32 either way."""
    import json

    config = json.loads((model / "config.json").read_text())
    if str(config.get("torch_dtype") or config.get("dtype")) not in ("float32", "None"):
        return model
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for item in model.iterdir():
        if item.name != "config.json":
            (view / item.name).symlink_to(item)
    config["dtype"] = "bfloat16"
    config.pop("torch_dtype", None)
    (view / "config.json").write_text(json.dumps(config, indent=1))
    return view


def net_estimates(tree: Path) -> dict[str, float]:
    """Estimated ms per net kind: the first net of each kind found (block_0, block_cache_0...)."""
    found: dict[str, tuple[str, float]] = {}
    for profile in sorted(tree.rglob("compiler_profile_0.txt")):
        match = _RUNTIME.search(profile.read_text(errors="replace"))
        if not match:
            continue
        # the net is named by its folder (tpugraph) or by the bmodel beside the profile (llm_convert)
        names = [profile.parent.name] + [p.stem for p in profile.parent.glob("*.bmodel")]
        for kind, pattern in KINDS.items():
            hit = next((n for n in names if re.fullmatch(pattern, n)), None)
            if hit and (kind not in found or _layer(hit) < _layer(found[kind][0])):
                found[kind] = (hit, float(match.group(1)))
    return {kind: ms for kind, (_, ms) in found.items()}


def _layer(name: str) -> int:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--quantize", default="bf16")
    parser.add_argument("--chip", default="bm1684x")
    parser.add_argument("--jobs", type=int, default=None,
                        help="tpugraph's --jobs for export and compile (default: each command's own default)")
    parser.add_argument("--work", type=Path, help="Where both runs write (default: a temporary folder, removed).")
    parser.add_argument("--tpu-mlir", type=Path, default=None)
    parser.add_argument("--with-default-check", action="store_true")
    args = parser.parse_args()
    venv = (args.tpu_mlir or default_venv()).resolve()
    if not (venv / "bin" / "activate").is_file():
        sys.exit(f"error: no tpu-mlir venv at {venv} (scripts/setup_tpu_mlir.sh)")
    if shutil.which("parallel") is None:
        sys.exit("error: GNU parallel is not on PATH (llm_convert.py deploys with it): apt-get install parallel")
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="bench-compile-"))
    theirs, ours = work / "llm_convert", work / "tpugraph"
    for d in (theirs, ours):
        shutil.rmtree(d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    model = half_precision_view(args.model.resolve(), work / "model")

    convert = (f'source "{venv}/bin/activate" && llm_convert.py -m "{model}" -s {args.seq} -q {args.quantize} '
               f'-c {args.chip} -o "{theirs}"')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    t_theirs = timed([convert], work / "llm_convert.log", env=env, shell=True)

    tpugraph = [sys.executable, "-m", "tpugraph"]
    jobs = ["--jobs", str(args.jobs)] if args.jobs else []
    t_export = timed([*tpugraph, "export-and-optimize", str(model), "-o", str(ours), "--seq-length", str(args.seq),
                      *jobs, "-q"], work / "export.log")
    t_compile = timed([*tpugraph, "compile", str(ours), "--tpu-mlir", str(venv), "--quantize", args.quantize,
                       "--chip", args.chip, *jobs, "--no-check", "-q"], work / "compile.log")
    t_checked = None
    if args.with_default_check:
        t_checked = timed([*tpugraph, "compile", str(ours), "--tpu-mlir", str(venv), "--quantize", args.quantize,
                           "--chip", args.chip, *jobs, "-q"], work / "compile-checked.log")

    theirs_bmodel = max(theirs.rglob("*.bmodel"), key=lambda p: p.stat().st_size)
    ours_bmodel = next(ours.glob("*.bmodel"))
    est_theirs, est_ours = net_estimates(theirs), net_estimates(ours / "compile")
    ours_total = t_export + t_compile

    print(f"{model.name}, SEQ {args.seq}, {args.quantize}, {args.chip}, {os.cpu_count()} cores")
    print(f"| {'':<40} | {'tpugraph':>10} | {'llm_convert':>11} | {'ratio':>6} |")
    print(f"|{'-' * 42}|{'-' * 12}:|{'-' * 13}:|{'-' * 7}:|")
    print(f"| {'HF -> bmodel s (export + compile --no-check)':<40} | {ours_total:>10.1f} | {t_theirs:>11.1f} | "
          f"{ours_total / t_theirs:>5.2f}x |")
    print(f"| {'  of which export s':<40} | {t_export:>10.1f} | {'':>11} | {'':>6} |")
    if t_checked is not None:
        total = t_export + t_checked
        print(f"| {'HF -> bmodel s (default check)':<40} | {total:>10.1f} | {t_theirs:>11.1f} | {total / t_theirs:>5.2f}x |")
    for kind in KINDS:
        if kind in est_ours or kind in est_theirs:
            a, b = est_ours.get(kind), est_theirs.get(kind)
            ratio = f"{a / b:>5.2f}x" if a and b else "     -"
            print(f"| {'est. chip ms ' + kind:<40} | {a if a is not None else '-':>10} | "
                  f"{b if b is not None else '-':>11} | {ratio} |")
    mb_ours, mb_theirs = ours_bmodel.stat().st_size / 1e6, theirs_bmodel.stat().st_size / 1e6
    print(f"| {'bmodel MB':<40} | {mb_ours:>10.1f} | {mb_theirs:>11.1f} | {mb_ours / mb_theirs:>5.2f}x |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
