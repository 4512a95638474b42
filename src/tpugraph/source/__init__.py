"""Model input: the family registry, the MODEL argument (folder, preset, .gguf) and its config, its weights
(safetensors, packed GPTQ/AWQ/compressed-tensors, GGUF) and its tokenizer."""
