"""Shared helpers for the pass tests: models built from ONNX text, onnxruntime runs, failure checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tpugraph.errors import PassError
from tpugraph.passes import GraphPass, PassContext, _numerics, run_chain


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def shapes_of(model: onnx.ModelProto) -> dict[str, tuple]:
    """Declared shape of every graph input/output; symbolic dims as their names."""
    out = {}
    for v in (*model.graph.input, *model.graph.output):
        out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                            for d in v.type.tensor_type.shape.dim)
    return out


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _numerics.run(model, feeds)


def feeds_for(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs; ``shapes`` supplies the dims of dynamic inputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for v in probe.graph.input:
        if shapes and v.name in shapes:
            dims = v.type.tensor_type.shape.dim
            for d, w in zip(dims, shapes[v.name]):
                d.Clear()
                d.dim_value = w
    return _numerics.random_feeds(probe, seed)


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto,
                        feeds: dict[str, np.ndarray] | None = None, atol: float = 1e-5,
                        io_perms: dict | None = None) -> dict[str, float]:
    """Both models on the same inputs (matched by position), outputs equal to ``atol``."""
    feeds = feeds if feeds is not None else _numerics.random_feeds(before)
    ref = run_ort(before, feeds)
    diffs = _numerics.compare(before, ref, feeds, after, io_perms)
    assert all(v <= atol for v in diffs.values()), diffs
    return diffs


def assert_fails_cleanly(model: onnx.ModelProto, chain: list[GraphPass], ctx: PassContext,
                         failing: str, match: str) -> PassError:
    """The chain raises PassError naming ``failing``, the segment and the passes before it; model untouched."""
    before_bytes = model.SerializeToString()
    with pytest.raises(PassError) as info:
        run_chain(model, chain, ctx)
    err = info.value
    ran = [p.name for p in chain[: [p.name for p in chain].index(failing)]]
    assert err.pass_name == failing
    assert err.segment == ctx.segment
    assert err.before == ran
    assert f"pass '{failing}'" in str(err) and f"segment '{ctx.segment}'" in str(err)
    for name in ran:
        assert name in str(err)
    assert match in err.reason, err.reason
    assert "\n" not in str(err)
    assert model.SerializeToString() == before_bytes
    return err


def export_tiny_llama_block(path: Path, seq: int = 16) -> dict[str, tuple[int, ...]]:
    """The prefill block of a 1-layer random Llama, exported as the exporter does (legacy, opset 15)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, head_dim=24)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()

    class Capture:
        def update(self, k, v, layer_idx, *args, **kwargs):
            self.k, self.v = k, v
            return k, v

    class Block(torch.nn.Module):
        def __init__(self, layer, rotary):
            super().__init__()
            self.layer, self.rotary = layer, rotary

        def forward(self, x, pos, mask):
            cos, sin = self.rotary(x, pos)
            cache = Capture()
            h = self.layer(x, attention_mask=mask, position_ids=pos, cache=cache, position_embeddings=(cos, sin))
            h = h[0] if isinstance(h, tuple) else h
            return h, cache.k.transpose(1, 2), cache.v.transpose(1, 2)

    x = torch.randn(1, seq, 64)
    pos = torch.arange(seq)[None]
    mask = torch.zeros(1, 1, seq, seq)
    with torch.no_grad():
        torch.onnx.export(Block(model.model.layers[0], model.model.rotary_emb), (x, pos, mask), str(path),
                          input_names=["input_states", "position_ids", "attention_mask"],
                          output_names=["hidden_states", "past_k", "past_v"], opset_version=15, dynamo=False)
    return {"input_states": (1, seq, 64), "position_ids": (1, seq), "attention_mask": (1, 1, seq, seq),
            "hidden_states": (1, seq, 64), "past_k": (1, seq, 2, 24), "past_v": (1, seq, 2, 24)}


@pytest.fixture(scope="session")
def tiny_block(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, ...]]]:
    import warnings

    path = tmp_path_factory.mktemp("llama") / "block_0.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shapes = export_tiny_llama_block(path)
    return path, shapes
