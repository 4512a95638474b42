"""Run the parallel export many times and check stdout, stderr and the outputs every time (issue #15).

Each iteration
  1. runs ``tpugraph export-and-optimize MODEL -o OUT --jobs 2 --no-weight-swap --json`` as a subprocess
     and checks: exit 0, stdout is exactly one complete JSON line, stderr is empty, and every output file
     is byte-identical to the first run's (the manifest without its volatile fields);
  2. runs the same export in this process from ``--threads`` threads at once (each with --jobs 2) and
     checks: no thread failed, ``sys.stdout``/``sys.stderr`` are still the objects they were, nothing was
     written on file descriptors 1 and 2, and every output is byte-identical to the first CLI run's.

    PYTHONPATH=src python scripts/stress_parallel_export.py --iterations 200

Exit 0 when every iteration passed, 1 at the first failure (described on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VOLATILE_KEYS = {"seconds", "export_seconds", "fingerprint"}


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def output_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file in OUT; the manifest without timings, fingerprints, tool versions and its path."""
    hashes = {}
    for path in sorted(out.iterdir()):
        if path.name == "manifest.json":
            manifest = json.loads(path.read_text())
            manifest.pop("tools", None)
            manifest["model"]["source"].pop("path", None)
            data = json.dumps(_stable(manifest), sort_keys=True).encode()
        else:
            data = path.read_bytes()
        hashes[path.name] = hashlib.sha256(data).hexdigest()
    return hashes


class Failure(Exception):
    pass


def cli_run(model: str, out: Path, seq_length: int) -> dict[str, str]:
    cmd = [sys.executable, "-m", "tpugraph", "export-and-optimize", model, "-o", str(out), "--jobs", "2",
           "--no-weight-swap", "--json", "--seq-length", str(seq_length)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Failure(f"exit {proc.returncode}; stderr: {proc.stderr.strip()[-500:]}")
    lines = proc.stdout.splitlines()
    if len(lines) != 1:
        raise Failure(f"stdout is {len(lines)} lines, not one JSON line: {proc.stdout!r}")
    try:
        summary = json.loads(lines[0])
    except ValueError:
        raise Failure(f"stdout is not complete JSON: {proc.stdout!r}") from None
    if not summary.get("complete"):
        raise Failure(f"summary says the output is not complete: {summary}")
    if proc.stderr:
        raise Failure(f"stderr is not empty: {proc.stderr[-500:]!r}")
    return output_hashes(out)


def in_process_round(model: str, outs: list[Path], seq_length: int) -> list[dict[str, str]]:
    """Exports from len(outs) threads at once; checks the process's stdout/stderr objects and descriptors."""
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize

    errors: list[BaseException] = []
    stdout, stderr = sys.stdout, sys.stderr

    def one(out: Path) -> None:
        try:
            export_and_optimize(model, out, ExportOptions(seq_length=seq_length, jobs=2, weight_swap=False))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with tempfile.TemporaryFile() as captured:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(captured.fileno(), 1)
        os.dup2(captured.fileno(), 2)
        try:
            threads = [threading.Thread(target=one, args=(out,)) for out in outs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        captured.seek(0)
        written = captured.read()
    if errors:
        raise Failure(f"a thread failed: {type(errors[0]).__name__}: {errors[0]}")
    if sys.stdout is not stdout or sys.stderr is not stderr:
        raise Failure("sys.stdout or sys.stderr was replaced during the run")
    if written:
        raise Failure(f"the threads wrote on stdout/stderr: {written[-500:]!r}")
    return [output_hashes(out) for out in outs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--model", default="tiny-llama", help="a preset or a model folder")
    parser.add_argument("--threads", type=int, default=2, help="in-process exports run at once per iteration")
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--no-in-process", action="store_true", help="only the CLI subprocess runs")
    args = parser.parse_args(argv)

    from tpugraph.source.checkpoint import resolve_model

    resolve_model(args.model)  # a preset is materialised once, before the timed loop
    work = Path(tempfile.mkdtemp(prefix="tpugraph-stress-"))
    expected: dict[str, str] | None = None
    start = time.perf_counter()
    try:
        for i in range(args.iterations):
            try:
                out = work / "cli"
                got = cli_run(args.model, out, args.seq_length)
                expected = expected or got
                if got != expected:
                    raise Failure(f"CLI outputs differ from the first run's: "
                              f"{sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))}")
                shutil.rmtree(out)
                if not args.no_in_process:
                    outs = [work / f"thread-{t}" for t in range(args.threads)]
                    for n, got in enumerate(in_process_round(args.model, outs, args.seq_length)):
                        if got != expected:
                            raise Failure(f"thread {n}'s outputs differ from the CLI run's")
                    for out in outs:
                        shutil.rmtree(out)
            except Failure as exc:
                print(f"iteration {i + 1}/{args.iterations} FAILED: {exc}", file=sys.stderr)
                return 1
            print(f"iteration {i + 1}/{args.iterations} ok ({time.perf_counter() - start:.0f}s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"all {args.iterations} iterations passed: complete JSON on stdout, empty stderr, identical outputs "
          f"(CLI --jobs 2 --no-weight-swap{'' if args.no_in_process else f' and {args.threads} threads in-process'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
