"""mlir_reuse: a weight-swapped layer's model_transform output derived from its template layer's (no toolchain:
the template's output is made here the way model_transform lays it out)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import TINY_LLAMA, build_model_dir
from onnx import numpy_helper

from tpugraph.compiler.mlir_reuse import WEIGHT_SUFFIX, derive_transform, same_output
from tpugraph.contract.manifest import read_manifest
from tpugraph.export.pipeline import ExportOptions, export_and_optimize


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    model = build_model_dir(tmp_path_factory.mktemp("m3"), "llama", **dict(TINY_LLAMA, num_hidden_layers=3))
    out = tmp_path_factory.mktemp("o3") / "out"
    export_and_optimize(str(model), out, ExportOptions(seq_length=8))
    return out


def inits(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def fake_transform(out, name, folder):
    """What model_transform leaves: NAME.mlir naming its weight npz, whose arrays are the graph's initializers
    (plus a constant of its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = dict(inits(out / f"{name}.onnx"))
    arrays["made_by_the_tool"] = np.arange(5, dtype=np.float32)
    np.savez(folder / f"{name}{WEIGHT_SUFFIX}", **arrays)
    (folder / f"{name}.mlir").write_text(
        f'#loc = loc(unknown)\nmodule @{name} attributes {{module.weight_file = "{name}{WEIGHT_SUFFIX}"}} {{\n}}\n')


def test_a_swapped_layer_gets_the_template_text_and_its_own_weights(three_layers, tmp_path):
    out = three_layers
    assert read_manifest(out).segment("block_2").graph_reused_from == "block_0"
    fake_transform(out, "block_0", tmp_path / "block_0")
    assert derive_transform("block_0", tmp_path / "block_0", out / "block_0.onnx", "block_2", tmp_path / "block_2",
                            out / "block_2.onnx")
    text = (tmp_path / "block_2" / "block_2.mlir").read_text()
    assert "module @block_2 " in text and f'"block_2{WEIGHT_SUFFIX}"' in text and "block_0" not in text
    own = inits(out / "block_2.onnx")
    with np.load(tmp_path / "block_2" / f"block_2{WEIGHT_SUFFIX}") as npz:
        assert set(npz.files) == set(own) | {"made_by_the_tool"}
        differs = 0
        for key, value in own.items():
            np.testing.assert_array_equal(npz[key], value)
            differs += not np.array_equal(value, inits(out / "block_0.onnx")[key])
        assert differs > 0  # really block_2's weights, not block_0's again
        np.testing.assert_array_equal(npz["made_by_the_tool"], np.arange(5, dtype=np.float32))
    # the proof: equal to what the tool itself would have written for block_2, and not to anything else
    fake_transform(out, "block_2", tmp_path / "real")
    assert same_output(tmp_path / "real", tmp_path / "block_2", "block_2")
    fake_transform(out, "block_1", tmp_path / "real1")
    (tmp_path / "real1" / "block_1.mlir").rename(tmp_path / "real1" / "x.mlir")
    assert not same_output(tmp_path / "real1", tmp_path / "block_2", "block_2")


def test_nothing_is_derived_without_the_template_output(three_layers, tmp_path):
    out = three_layers
    assert not derive_transform("block_0", tmp_path / "missing", out / "block_0.onnx", "block_2", tmp_path / "b2",
                                out / "block_2.onnx")
    assert not (tmp_path / "b2").exists()
