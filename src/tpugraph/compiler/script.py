"""A CompilePlan -> a self-contained bash script that lives in OUT (rendering, and writing it atomically)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from .. import __version__
from ..contract.manifest import Manifest, read_manifest
from ..errors import OutputError
from ..tpu_mlir.guest import guest_script
from ..tpu_mlir.toolchain import TOOLS
from .options import CompileOptions
from .plan import OUT_VAR, TRANSFORM_DRIVER, CompilePlan, StepAction, plan_compile


def _shell_word(arg: str) -> str:
    if arg.startswith(OUT_VAR):
        rest = arg[len(OUT_VAR):]
        return '"$OUT"' + (shlex.quote(rest) if rest else "")
    return shlex.quote(arg)


def _shell_command(argv: tuple[str, ...]) -> str:
    """One command, an option and its value per line."""
    lines = [_shell_word(argv[0])]
    i = 1
    if argv[0] == "python3":  # the interpreter and its script on one line
        lines[0] += " " + _shell_word(argv[1])
        i = 2
    while i < len(argv):
        word = _shell_word(argv[i])
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            word += " " + _shell_word(argv[i + 1])
            i += 1
        lines.append(word)
        i += 1
    return " \\\n    ".join(lines)


# embedding.f32.bin -> embedding.bin in f16 or bf16 (round to nearest even), in chunks; as embedding_table.py does.
_TABLE_SCRIPT = (
    "import sys, numpy as np",
    "src, dst, kind = sys.argv[1:]",
    "rows = np.memmap(src, dtype=np.float32, mode='r')",
    "with open(dst + '.tmp', 'wb') as f:",
    "    for i in range(0, rows.size, 1 << 24):",
    "        x = np.asarray(rows[i:i + (1 << 24)])",
    "        if kind == 'f16':",
    "            f.write(x.astype(np.float16).tobytes())",
    "        else:",
    "            b = x.view(np.uint32)",
    "            r = ((b + (0x7FFF + ((b >> 16) & 1))) >> 16).astype(np.uint16)",
    "            f.write(np.where(np.isnan(x), np.uint16(0x7FC0), r).astype(np.uint16).tobytes())",
    "import os; os.replace(dst + '.tmp', dst)",
)


def render_script(plan: CompilePlan, manifest: Manifest) -> str:
    """The plan as a self-contained bash script that lives in OUT (paths relative to its own folder)."""
    m = manifest.model
    opts = plan.options
    checked = sum(1 for s in plan.steps if s.action == StepAction.TRANSFORM and s.checked)
    lines = [
        "#!/usr/bin/env bash",
        f"# Compile the segments of this tpugraph output into {plan.bmodel} with tpu-mlir.",
        f"# Written by tpugraph {__version__}; regenerate with: {plan.command}",
        f"# Model: {m.architecture} ({m.model_type}), {m.num_layers} layers, "
        f"SEQ {manifest.options.seq_length}; chip {opts.chip}, {opts.quantize}"
        + (f" (group {opts.q_group_size})" if opts.q_group_size else "") + f", {opts.num_device} device(s).",
        f"# Numerical checks: {checked} of {len(plan.segments)} segments compared by the tools (check mode "
        f"{opts.check}; test data from tpugraph export-and-optimize --with-test-data).",
        "# Needs tpu-mlir 1.30 on PATH: source \"$(scripts/setup_tpu_mlir.sh)/bin/activate\" in the tpugraph repo.",
        "# Usage: bash SCRIPT [OUT]   (OUT defaults to the script's own folder)",
        *([f"# The tied vocabulary matrix is stored once: {plan.vocab_sharing.lm_head} and "
           f"{', '.join(plan.vocab_sharing.last_layer)} are compiled from the rewritten files in "
           f"{plan.work_dir}/ (the final norm moved into the last layer; tpugraph vocab_sharing.py)."]
          if plan.vocab_sharing else []),
        *([f"# {opts.num_device} devices: {plan.tensor_parallel_note}."] if plan.tensor_parallel_note else []),
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
            if step.action == StepAction.COMBINE:
                lines.append("# All nets into one bmodel; the runtime finds them by name.")
                lines.append('cd "$WORK"')
            else:
                lines.append(f"# {step.segment}")
                lines.append(f'mkdir -p "$WORK/{step.segment}" && cd "$WORK/{step.segment}"')
        lines.append(_shell_command(step.argv))
    lines += ["", f'echo "wrote $OUT/{plan.bmodel}"']
    table = manifest.conventions.embedding_disk
    if table:  # --embedding-disk: the vocabulary rows in the compile's float type, as tpugraph compile writes them
        from ..contract.embedding_table import COMPILED_NAME
        from .plan import _float_mode

        lines += ["", f"# {COMPILED_NAME}: the embedding rows the runtime gathers on the host (--embedding-disk), "
                      f"in {_float_mode(opts.quantize)}.",
                  f'python3 - "$OUT/{table.file}" "$OUT/{COMPILED_NAME}" {_float_mode(opts.quantize)} <<\'PY\'',
                  *_TABLE_SCRIPT, "PY", f'echo "wrote $OUT/{COMPILED_NAME}"']
    if plan.end_to_end:
        lines.append(f'echo "check it end to end: tpugraph verify \\"$OUT\\" --bmodel \\"$OUT/{plan.bmodel}\\""')
    lines.append("")
    return "\n".join(lines)


def _write_atomically(target: Path, data: bytes, mode: int) -> None:
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.chmod(mode)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None


def save_script(plan: CompilePlan, manifest: Manifest, target: Path) -> Path:
    """Write the rendered script to ``target`` atomically (a temporary name, then a rename), executable, and
    the transform driver it runs into the compile's work folder of the OUT the script lies in."""
    out_dir = target.parent
    _write_atomically(target, render_script(plan, manifest).encode(), 0o755)
    driver = guest_script(TRANSFORM_DRIVER)
    _write_atomically(out_dir / plan.work_dir / TRANSFORM_DRIVER, driver.read_bytes(), 0o644)
    if plan.vocab_sharing:  # the nets the script hands tpu-mlir instead of OUT's (vocab_sharing.py)
        from .vocab_sharing import write_shared

        write_shared(out_dir, manifest, plan.vocab_sharing, plan.work_dir)
    if plan.eval_head:  # compile --eval-head: lm_head_all, derived from OUT's lm_head (eval_head.py)
        from .eval_head import write_eval_head
        from .vocab_sharing import rewritten_file

        write_eval_head(out_dir, manifest, out_dir / rewritten_file(plan.work_dir, plan.eval_head),
                        shared=plan.vocab_sharing is not None)
    return target


def write_compile_script(out: str | Path, options: CompileOptions | None = None,
                         path: str | Path | None = None) -> Path:
    """Write the compile script (default OUT/compile_<quantize>_<chip>_<N>dev.sh) and return its path.

    The script compiles the OUT it is given as its argument, else the folder it lies in."""
    out_dir = Path(out)
    manifest = read_manifest(out_dir)
    plan = plan_compile(out_dir, options, manifest)
    return save_script(plan, manifest, Path(path) if path else out_dir / plan.script_name)
