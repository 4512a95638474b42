"""tpu-mlir tools' output -> facts: the numerical compares' cosine, why a tool failed, the lines worth showing."""

from __future__ import annotations

import re

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


def log_tail(text: str, lines: int = 25) -> str:
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
