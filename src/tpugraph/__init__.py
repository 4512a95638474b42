"""tpugraph: Hugging Face causal LMs -> the ONNX segments of Sophgo's tpu-mlir / LLM-TPU runtime."""

__version__ = "0.1.0"
