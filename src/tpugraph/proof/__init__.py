"""Proof and inspection: OUT (or its bmodel) against transformers token for token, transformers' own model as the
reference, and a summary of an ONNX file or OUT folder."""
