"""Torch segment wrappers and the exporter that turns them into ONNX."""
