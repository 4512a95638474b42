"""Running OUT the way the TPU runtime does: the loop over the nets (prefill, KV cache, decode), sampling, the
backends the nets run on (onnxruntime, a bmodel on the cmodel), text in and out, conversations and chat."""
