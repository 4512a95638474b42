"""model_transform's output for one layer -> the same for another layer of the same graph (weight swapping).

Layers whose ONNX graph was reused from another layer at export (``graph_reused_from``) differ from it only in
their initializers' values: model_transform turns them into the same MLIR text (but for the module and weight
file names) and a weight npz whose arrays are those initializers. So their MLIR is the template's, renamed, and
their npz is the template's keys with this layer's values. A key whose array is none of the template's
initializers (a constant model_transform made itself) keeps the template's value: the compile runner proves
that right once per structure by transforming the first reused layer for real and comparing (``same_output``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

WEIGHT_SUFFIX = "_top_f32_all_weight.npz"


def _initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))  # with its external data, from beside the file
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


class TemplateIndex:
    """A template layer's transform output, read once for every layer derived from it: its MLIR text, its npz
    arrays, and which ONNX initializer each array is. None of a template whose output is missing."""

    def __init__(self, template: str, template_dir: Path, template_onnx: Path):
        self.template = template
        self.text = (template_dir / f"{template}.mlir").read_text()
        with np.load(template_dir / f"{template}{WEIGHT_SUFFIX}") as npz:
            self.arrays = {key: npz[key] for key in npz.files}
        by_value: dict[tuple, str] = {}
        for name, array in _initializers(template_onnx).items():
            by_value.setdefault((array.dtype.str, array.shape, array.tobytes()), name)
        # npz key -> the initializer it is, or None (a constant model_transform made: layer-independent, proven)
        self.source = {key: by_value.get((a.dtype.str, a.shape, a.tobytes())) for key, a in self.arrays.items()}

    @classmethod
    def read(cls, template: str, template_dir: Path, template_onnx: Path) -> "TemplateIndex | None":
        if not (template_dir / f"{template}.mlir").is_file() or not (template_dir / f"{template}{WEIGHT_SUFFIX}").is_file():
            return None
        return cls(template, template_dir, template_onnx)

    def derive(self, target: str, target_dir: Path, target_onnx: Path) -> bool:
        """Write ``{target}.mlir`` and its weight npz in target_dir. False (nothing written) when a weight cannot be
        matched or the MLIR does not name the template's module and weight file once."""
        old_file, new_file = f"{self.template}{WEIGHT_SUFFIX}", f"{target}{WEIGHT_SUFFIX}"
        module = f'module @{self.template} '
        if self.text.count(old_file) != 1 or self.text.count(module) != 1:
            return False
        values = _initializers(target_onnx)
        out: dict[str, np.ndarray] = {}
        for key, array in self.arrays.items():
            source = self.source[key]
            if source is None:
                out[key] = array  # not a weight of the graph: proven layer-independent by the runner
                continue
            value = values.get(source)
            if value is None or value.shape != array.shape:
                return False
            out[key] = value.astype(array.dtype, copy=False)
        target_dir.mkdir(parents=True, exist_ok=True)
        tmp = target_dir / f".{target}.tmp{os.getpid()}.npz"
        np.savez(tmp, **out)
        os.replace(tmp, target_dir / new_file)
        (target_dir / f"{target}.mlir").write_text(self.text.replace(old_file, new_file).replace(module, f"module @{target} "))
        return True


def derive_transform(template: str, template_dir: Path, template_onnx: Path, target: str, target_dir: Path,
                     target_onnx: Path) -> bool:
    """Write ``{target}.mlir`` and its weight npz in target_dir from the template's transform output.
    False (nothing written) when the template's output is missing or a weight cannot be matched."""
    index = TemplateIndex.read(template, template_dir, template_onnx)
    return index is not None and index.derive(target, target_dir, target_onnx)


def same_output(real_dir: Path, derived_dir: Path, name: str) -> bool:
    """The derived MLIR and weights equal model_transform's own for that layer (the proof for a structure)."""
    try:
        if (real_dir / f"{name}.mlir").read_text() != (derived_dir / f"{name}.mlir").read_text():
            return False
        with np.load(real_dir / f"{name}{WEIGHT_SUFFIX}") as a, np.load(derived_dir / f"{name}{WEIGHT_SUFFIX}") as b:
            return sorted(a.files) == sorted(b.files) and all(
                a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a.files)
    except OSError:
        return False
