#!/usr/bin/env python3
"""tpu-mlir's estimate of an InternVL3 vision tower (the `vit` net, one 448x448 tile) on the chip: compiled by tpugraph
vs by llm_convert.

Builds an InternVL3-1B-shaped vision tower with random weights (InternViT-300M: 24 layers of 1024, 16 heads, MLP
4096, q/k/v bias, 448 px tiles of 14 px patches, pixel shuffle 0.5, MLP projector to 896; a one-layer Qwen2 language
model, since only the vit is measured) twice: in transformers' layout (InternVLForConditionalGeneration, what
tpugraph exports) and the same weights in OpenGVLab's original layout (InternVLChatModel's `vision_model.`, `mlp1.`,
q/k/v fused into `attn.qkv`, model_type internvl_chat: what llm_convert reads). Then:

- tpugraph: export-and-optimize, then the plan's own transform and deploy steps of the vit net (compile's flags:
  F16/BF16, --quant_output, --high_precision; no compares);
- llm_convert: tpu-mlir's InternVL3Converter in the tpu-mlir venv, run for its vit only (as scripts/vit_estimate.py
  runs Qwen2_5VLConverter: gen_vit_mlir, then the model_deploy command its compile_vit queues),

and prints the `runtime: X ms` line of each net's compiler_profile_0.txt (the compiler's estimate of one run, one
tile, on the chip), with the seconds each compile took. llm_convert's InternVL3 vit hard-codes InternViT-300M at 448
px (1025 tokens, width 1024), so the shape is fixed.

Usage: internvl_vit_estimate.py [--quantize bf16] [--chip bm1684x] [--tpu-mlir VENV] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VISION_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=448, patch_size=14, attention_bias=True, layer_norm_eps=1e-6, initializer_range=0.02)
TEXT = dict(model_type="qwen2", vocab_size=512, hidden_size=896, intermediate_size=256, num_hidden_layers=1,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
SIDE = VISION_300M["image_size"]
# transformers' InternViT names -> the original checkpoint's (q/k/v are fused into attn.qkv separately)
LAYER_NAMES = (("attention.projection_layer", "attn.proj"), ("layernorm_before", "norm1"),
               ("layernorm_after", "norm2"), ("lambda_1", "ls1"), ("lambda_2", "ls2"))
EMBEDDING_NAMES = {"cls_token": "class_embedding", "position_embeddings": "position_embedding",
                   "patch_embeddings.projection.weight": "patch_embedding.weight",
                   "patch_embeddings.projection.bias": "patch_embedding.bias"}
PROJECTOR_NAMES = (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3"))


def build_model(folder: Path) -> Path:
    """The transformers-layout model (tests/vlm_models.py's builder at InternViT-300M's shape)."""
    if (folder / "config.json").is_file():
        return folder
    sys.path.insert(0, str(HERE.parent / "tests"))
    import vlm_models

    vlm_models.INTERNVL_VISION, vlm_models.INTERNVL_TEXT = dict(VISION_300M), dict(TEXT)
    return vlm_models.build_internvl(folder)


def original_name(key: str) -> str | None:
    """A transformers-layout key's name in OpenGVLab's layout; None for k_proj/v_proj (fused into q's qkv)."""
    if key.startswith("vision_tower.encoder.layer."):
        index, rest = key[len("vision_tower.encoder.layer."):].split(".", 1)
        if rest.startswith(("attention.k_proj.", "attention.v_proj.")):
            return None
        if rest.startswith("attention.q_proj."):
            rest = "attn.qkv." + rest.rsplit(".", 1)[1]
        for ours, theirs in LAYER_NAMES:
            rest = rest.replace(ours, theirs)
        return f"vision_model.encoder.layers.{index}.{rest}"
    if key.startswith("vision_tower.embeddings."):
        return "vision_model.embeddings." + EMBEDDING_NAMES[key[len("vision_tower.embeddings."):]]
    if key.startswith("multi_modal_projector."):
        rest = key[len("multi_modal_projector."):]
        for ours, theirs in PROJECTOR_NAMES:
            rest = rest.replace(ours, theirs)
        return "mlp1." + rest
    return key  # the language model: language_model.model.*, language_model.lm_head.*


def original_layout(model: Path, folder: Path, dtype: str) -> Path:
    """The same weights as OpenGVLab's InternVLChatModel checkpoint, with its config.json, in ``dtype`` (bfloat16 as
    released; float16 for an F16 comparison: llm_convert refuses a quantize type other than the checkpoint's)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from safetensors.torch import load_file, save_file

    state = {}
    for file in sorted(model.glob("*.safetensors")):
        state.update(load_file(str(file)))
    out = {}
    for key, value in state.items():
        name = original_name(key)
        if name is None:
            continue
        if ".attn.qkv." in name:
            value = torch.cat([state[key.replace("q_proj", f"{n}_proj")] for n in "qkv"])
        out[name] = value.to(getattr(torch, dtype)).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    llm = {**json.loads((model / "config.json").read_text())["text_config"], "architectures": ["Qwen2ForCausalLM"]}
    vision = {**VISION_300M, "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "qkv_bias": True,
              "hidden_act": "gelu", "norm_type": "layer_norm"}
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "llm_config": llm, "vision_config": vision, "select_layer": -1, "force_image_size": SIDE,
        "ps_version": "v2", "torch_dtype": dtype, "tie_word_embeddings": False}, indent=1))
    for file in model.iterdir():  # the tokenizer (llm_convert copies it beside the bmodel)
        if file.name.startswith("tokenizer") or file.name in ("special_tokens_map.json", "chat_template.jinja"):
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantize", default="bf16", choices=("f16", "bf16"))
    ap.add_argument("--chip", default="bm1684x")
    ap.add_argument("--tpu-mlir", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    sys.path.insert(0, str(HERE))
    from vit_estimate import llm_convert_vit, print_side_by_side, tpugraph_vit

    from tpugraph.compiler import CompileOptions, check_toolchain

    venv = check_toolchain(args.tpu_mlir)
    work = (args.work or Path(tempfile.mkdtemp(prefix="internvl-vit-estimate-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work / "model")
    dtype = {"bf16": "bfloat16", "f16": "float16"}[args.quantize]
    original = original_layout(model, work / f"model-original-{dtype}", dtype)
    options = CompileOptions(chip=args.chip, quantize=args.quantize, check="none")
    ours_ms, ours_s, ours_argv = tpugraph_vit(model, work, SIDE * SIDE, options, venv)
    theirs_ms, theirs_s, theirs_cmd = llm_convert_vit(original, work, SIDE, SIDE, args.quantize, args.chip, venv)
    print(f"InternVL3-1B-shaped vit (InternViT-300M), random weights, one {SIDE}x{SIDE} tile (1024 patches, 256 "
          f"tokens), {args.quantize} {args.chip}: compiler's estimate per run")
    print_side_by_side(ours_ms, ours_s, ours_argv, theirs_ms, theirs_s, theirs_cmd, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
