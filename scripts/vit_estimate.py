#!/usr/bin/env python3
"""tpu-mlir's estimate of a Qwen2.5-VL vision tower (the `vit` net) on the chip: compiled by tpugraph vs by llm_convert.

Builds a Qwen2.5-VL-3B-shaped model with random weights (the 3B's vision config: 32 blocks of 1280, 16 heads, MLP
3420, windows of 112 px, full attention in blocks 7/15/23/31, merger to 2048; a one-layer language model of hidden
2048, since only the vit is measured), saved in bfloat16 as the real checkpoint is. Then, at one image size:

- tpugraph: export-and-optimize with --max-pixels W*H, then the plan's own transform and deploy steps of the vit net
  (compile's flags: F16/BF16, --quant_output, --high_precision; no compares);
- llm_convert: tpu-mlir's Qwen2_5VLConverter in the tpu-mlir venv, run for its vit only (gen_vit_mlir, then the
  model_deploy command its compile_vit queues, run with bash instead of GNU parallel),

and prints the `runtime: X ms` line of each net's compiler_profile_0.txt (the compiler's estimate of one run on the
chip, see /work/shared/TPU-MLIR.md), with the seconds each compile took.

Usage: vit_estimate.py [--width 224 --height 224] [--quantize bf16] [--chip bm1684x] [--tpu-mlir VENV] [--work DIR]
                       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VISION_3B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                 window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, temporal_patch_size=2,
                 spatial_merge_size=2, in_chans=3)
TEXT = dict(vocab_size=512, hidden_size=2048, intermediate_size=256, num_hidden_layers=1, num_attention_heads=16,
            num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})

# Run by the tpu-mlir venv's python: llm_convert.py's own argument handling and converter, its vit only.
LLM_CONVERT_VIT = r'''
import os, runpy, subprocess, sys
import tpu_mlir
model, work, width, height, quantize, chip = sys.argv[1:7]
python_dir = os.path.join(os.path.dirname(tpu_mlir.__file__), "python")
sys.path[:0] = [python_dir, os.path.join(python_dir, "tools")]
from llm.LlmConverter import LlmConverter

def vit_only(self):
    os.makedirs(self.bmodel_dir, exist_ok=True)
    os.chdir(self.bmodel_dir)
    self.gen_vit_mlir()
    self.vit_quantize = self._detect_vit_quantize()
    self.compile_vit()
    for command in self.commands:  # what execute_tasks hands GNU parallel, one line per task
        print("RUN", command.strip(), flush=True)
        subprocess.run(["bash", "-c", command], check=True)
    print("VIT_DIR", os.path.join(self.bmodel_dir, "vit"), flush=True)

LlmConverter.run = vit_only
sys.argv = ["llm_convert.py", "-m", model, "-s", "128", "-q", quantize, "-c", chip, "--max_pixels",
            f"{width},{height}", "-o", work]
runpy.run_path(os.path.join(python_dir, "tools", "llm_convert.py"), run_name="__main__")
'''


def build_model(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from vlm_models import TOKEN_IDS, save_vlm_tokenizer

    config = Qwen2_5_VLConfig(text_config=dict(TEXT), vision_config=dict(VISION_3B), tie_word_embeddings=False,
                              **TOKEN_IDS)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ("norm" in name or ".ln_q." in name) and name.endswith("weight"):
                # A trained norm's weight is not all ones; ones would be folded away at export and leave a norm
                # without its weight, a graph no real checkpoint gives (and tpu-mlir fuses differently).
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    save_vlm_tokenizer(folder, TEXT["vocab_size"])
    Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2).save_pretrained(folder)
    return folder


def profile_ms(net_dir: Path) -> float:
    text = (net_dir / "compiler_profile_0.txt").read_text()
    times = [float(ms) for ms in re.findall(r"runtime: ([0-9.]+)\s*ms", text)]
    if not times:
        raise SystemExit(f"error: {net_dir}/compiler_profile_0.txt has no runtime line")
    return sum(times)


def tpugraph_vit(model: Path, work: Path, pixels: int, options, venv: Path) -> tuple[float, float, list[str]]:
    """(estimated ms, compile seconds, the deploy's argv) of the vit net as tpugraph compiles it."""
    from tpugraph.compiler.plan import TRANSFORM_DRIVER, plan_compile
    from tpugraph.compiler.runner import run_step
    from tpugraph.export.pipeline import ExportOptions, export_and_optimize
    from tpugraph.tpu_mlir.guest import guest_script
    from tpugraph.tpu_mlir.toolchain import tool_environment

    out = work / "tpugraph-out"
    if not (out / "manifest.json").is_file():
        export_and_optimize(str(model), out, ExportOptions(seq_length=128 + pixels // 14 ** 2 // 4,
                                                           max_pixels=pixels, force=True))
    plan = plan_compile(out, options)
    (out / plan.work_dir).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(guest_script(TRANSFORM_DRIVER), out / plan.work_dir / TRANSFORM_DRIVER)
    env = tool_environment(venv)
    start = time.time()
    deploy = []
    for step in plan.steps:
        if step.segment != "vit":
            continue
        rc, text, log_path = run_step(step, out, env)
        if rc != 0:
            raise SystemExit(f"error: tpugraph's vit {step.action} failed, see {log_path}:\n"
                             + "\n".join(text.splitlines()[-15:]))
        if step.action == "deploy":
            deploy = list(step.argv)
    return profile_ms(out / plan.work_dir / "vit"), time.time() - start, deploy


def llm_convert_vit(model: Path, work: Path, width: int, height: int, quantize: str, chip: str,
                    venv: Path) -> tuple[float, float, str]:
    """(estimated ms, seconds, the deploy command) of llm_convert's own vit net."""
    from tpugraph.tpu_mlir.toolchain import tool_environment

    guest = work / "llm_convert_vit.py"
    guest.write_text(LLM_CONVERT_VIT)
    env = tool_environment(venv)
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"  # its tools are `#!/usr/bin/env python3` scripts
    start = time.time()
    log = work / "llm_convert_vit.log"
    with open(log, "w") as fh:
        rc = subprocess.run([str(venv / "bin" / "python"), str(guest), str(model), str(work / "llm_convert-out"),
                             str(width), str(height), quantize, chip], stdout=fh, stderr=subprocess.STDOUT,
                            env=env, cwd=work).returncode
    text = log.read_text(errors="replace")
    if rc != 0 or "VIT_DIR" not in text:
        tail = "\n".join(text.splitlines()[-15:])
        raise SystemExit(f"error: llm_convert's vit failed (exit {rc}), see {log}:\n{tail}")
    vit_dir = Path(re.search(r"^VIT_DIR (.+)$", text, re.MULTILINE).group(1))
    command = re.search(r"^RUN (.+)$", text, re.MULTILINE).group(1)
    return profile_ms(vit_dir), time.time() - start, command


def print_side_by_side(ours_ms: float, ours_s: float, ours_argv, theirs_ms: float, theirs_s: float, theirs_cmd,
                       args) -> None:
    """The two estimates, their ratio and (``--json``) the record, as every vit estimate script prints them."""
    print(f"  tpugraph     {ours_ms:10.3f} ms   (vit transform + deploy {ours_s:.0f} s)")
    print(f"  llm_convert  {theirs_ms:10.3f} ms   (vit mlir + deploy {theirs_s:.0f} s)")
    print(f"  ratio tpugraph / llm_convert: {ours_ms / theirs_ms:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "tpugraph": {"runtime_ms": ours_ms, "seconds": ours_s, "deploy": ours_argv},
                                         "llm_convert": {"runtime_ms": theirs_ms, "seconds": theirs_s,
                                                         "deploy": theirs_cmd}}, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=224)
    ap.add_argument("--height", type=int, default=224)
    ap.add_argument("--quantize", default="bf16", choices=("f16", "bf16"))
    ap.add_argument("--chip", default="bm1684x")
    ap.add_argument("--tpu-mlir", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from tpugraph.compiler import CompileOptions, check_toolchain

    venv = check_toolchain(args.tpu_mlir)
    work = (args.work or Path(tempfile.mkdtemp(prefix="vit-estimate-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pixels = args.width * args.height
    if args.width % 28 or args.height % 28:
        raise SystemExit("error: --width and --height must be multiples of 28 (patch 14 x merge 2)")
    model = build_model(work / "model")
    options = CompileOptions(chip=args.chip, quantize=args.quantize, check="none")
    ours_ms, ours_s, ours_argv = tpugraph_vit(model, work, pixels, options, venv)
    theirs_ms, theirs_s, theirs_cmd = llm_convert_vit(model, work, args.width, args.height, args.quantize, args.chip,
                                                      venv)
    patches = pixels // 14 ** 2
    print(f"Qwen2.5-VL-3B-shaped vit, random weights, {args.width}x{args.height} ({patches} patches, "
          f"{patches // 4} tokens), {args.quantize} {args.chip}: compiler's estimate per run")
    print_side_by_side(ours_ms, ours_s, ours_argv, theirs_ms, theirs_s, theirs_cmd, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
