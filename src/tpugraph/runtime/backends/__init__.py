"""Where segments run: one small interface (run a net by name with its inputs in order, get its outputs in order)
and its implementations: onnxruntime on OUT's ONNX files, and a combined bmodel on tpu-mlir's cmodel.

The greedy loop of CONTRACT.md (runtime.SegmentRuntime) is written once against this interface, so every
backend is driven exactly the same way. A board's runtime plugs in as one more class with these methods.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class SegmentBackend(Protocol):
    name: str  # what the reports call it: "onnxruntime", "onnx-reference", "bmodel (cmodel, bm1684x)"

    def run(self, net: str, *arrays: np.ndarray) -> list[np.ndarray]:
        """Run ``net`` with ``arrays`` in the contract's input order; its outputs in order (floats as float32)."""
        ...

    def close(self) -> None:
        ...


BACKENDS = ("onnx", "bmodel")
