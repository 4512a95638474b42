#!/usr/bin/env python3
"""Write a random-weight model with the published shape of a real one, as bf16 safetensors shards.

Tensors are made one at a time and written shard by shard, so the whole model never sits in memory
(let alone in fp32). Usage: make_random_model.py --shape qwen2.5-0.5b OUT [--layers N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645),
    "qwen2.5-7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       bos_token_id=151643, eos_token_id=151645),
    "llama-3.2-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=128001),
    "llama-2-7b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2),
}

SHARD_BYTES = 2 * 1024**3


def write_random_model(shape: str, out: Path, layers: int | None = None, seed: int = 0, std: float = 0.02) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    if layers is not None:
        spec["num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, **spec)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, _ in skeleton.named_parameters()]  # tied lm_head is not listed a second time
    shapes = dict((n, p.shape) for n, p in skeleton.named_parameters())
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    shard_files: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        name = f"model-{len(shard_files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for key in shard:
            weight_map[key] = name
        shard_files.append(name)
        shard, shard_bytes = {}, 0

    for name in names:
        if tied and name == "lm_head.weight":
            continue
        shp = shapes[name]
        if name.endswith("norm.weight"):
            # Trained norms are not all ones; equal norm weights would also hide swapped tensors.
            t = (1.0 + torch.randn(shp, generator=gen) * std).to(torch.bfloat16)
        else:
            t = (torch.randn(shp, generator=gen) * std).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if shard and shard_bytes + nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        shard_bytes += nbytes
    flush()
    # Final names carry the shard count, as save_pretrained writes them.
    total = len(shard_files)
    renamed = {}
    for i, old in enumerate(shard_files, 1):
        new = f"model-{i:05d}-of-{total:05d}.safetensors"
        (out / old).rename(out / new)
        renamed[old] = new
    index = {"metadata": {"total_size": sum((out / n).stat().st_size for n in renamed.values())},
             "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (for quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_random_model(args.shape, args.out, args.layers, args.seed)
    print(f"wrote {args.shape} (random bf16 weights) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
