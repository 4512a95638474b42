"""PEFT LoRA adapters made in code for the tests: get_peft_model on a tiny saved model, random non-zero B (a
freshly initialised adapter has B = 0 and changes nothing), save_pretrained."""

from __future__ import annotations

from pathlib import Path


def make_adapter(model_dir: Path, folder: Path, seed: int = 1, r: int = 4, lora_alpha: float = 8.0,
                 target_modules=("q_proj", "v_proj", "down_proj"), b_std: float = 0.2, **config) -> Path:
    """A LoRA adapter of the model in ``model_dir`` saved into ``folder`` (adapter_config.json +
    adapter_model.safetensors); ``config``: more LoraConfig fields (use_rslora, use_dora, rank_pattern...)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules),
                                                  **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
            elif "modules_to_save" in name:  # a fine-tuned copy differs from the base's
                param.add_(torch.randn(param.shape, generator=gen) * b_std)
    peft_model.save_pretrained(str(folder))
    return folder
