"""Plain-language notes for the manifest: how faithful an export is (sliding windows, rope, dtype)."""

from __future__ import annotations

from ..source.families import FamilySpec


def unused_inputs_note(unused: dict[str, list[str]]) -> str:
    """The note for segments whose graph ignores some contract inputs (segment name -> input names)."""
    listed = "; ".join(f"{name}: {', '.join(ins)}" for name, ins in unused.items())
    return (f"inputs the graph does not read, still declared so the runtime can feed by position ({listed}); e.g. "
            "position_ids of a layer without rotary embedding (NoPE). A pass or compiler that drops unused "
            "inputs would shift the runtime's positional feeding")


def export_notes(family: FamilySpec, config, seq: int, dtype: str = "float32") -> list[str]:
    """Plain-language notes on how faithful an export of this model at SEQ is (stored in the manifest)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    notes: list[str] = []
    layers = int(text_config.num_hidden_layers)
    windows: dict[int, list[int]] = {}
    for i in range(layers):
        w = family.sliding_window(text_config, i)
        if w is not None:
            windows.setdefault(w, []).append(i)
    for w, idx in sorted(windows.items()):
        which = "all layers" if len(idx) == layers else f"layers {_ranges(idx)}"
        if seq <= w:
            notes.append(f"sliding window: {which} attend over a window of {w} tokens; SEQ={seq} <= {w}, so "
                         "full causal attention is the window and those blocks are exact")
        else:
            notes.append(f"sliding window: {which} attend over a window of {w} tokens; SEQ={seq} > {w}, so "
                         "those blocks mask keys >= window positions behind the query themselves (from "
                         "position_ids; history slot c = position c), which is exact as long as the runtime "
                         "keeps the contract's slot-n-holds-position-n history")
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    params = [rope] + [p for p in rope.values() if isinstance(p, dict)] if isinstance(rope, dict) else []
    for p in params:
        rope_type = p.get("rope_type") or p.get("type")
        if rope_type not in ("dynamic", "longrope"):
            continue
        original = (p.get("original_max_position_embeddings")
                    or getattr(text_config, "original_max_position_embeddings", None)
                    or getattr(text_config, "max_position_embeddings", None))
        if original and seq > int(original):
            notes.append(f"rope '{rope_type}' depends on the sequence length: the baked cos/sin table is what "
                         f"transformers computes for {seq} tokens (past original_max_position_embeddings="
                         f"{original}), while transformers itself uses the unscaled rope until a sequence is "
                         f"longer than {original}; shorter conversations differ from transformers")
            break
    state_layers = family.state_layers(text_config)
    if state_layers and family.state_kind == "short_conv":
        notes.append(f"state layers: {_ranges(list(state_layers))} are short convolutions with a conv state "
                     "instead of a KV cache; their block_i takes (input_states, attention_mask) and starts from a "
                     "zero state, their block_cache_i takes (input_states, conv_state); both return (hidden_states, "
                     "next_conv_state), and the runtime keeps the state per layer (README, 'State segments')")
    elif state_layers:
        notes.append(f"state layers: {_ranges(list(state_layers))} are linear attention with a conv state and a "
                     "recurrent state instead of a KV cache; their block_i takes (input_states, attention_mask) "
                     "and starts from a zero state, their block_cache_i takes (input_states, conv_state, "
                     "recurrent_state); both return (hidden_states, next_conv_state, next_recurrent_state), and "
                     "the runtime keeps the two states per layer (README, 'State segments')")
    if dtype != "float32":
        notes.append(f"weights are {dtype}; segment inputs/outputs stay float32 (cast at the segment "
                     "boundary), and numerics differ from the float32 model by that dtype's rounding")
    return notes


def _ranges(idx: list[int]) -> str:
    if len(idx) > 6:
        return f"{', '.join(map(str, idx[:6]))}, ... ({len(idx)} layers)"
    return ", ".join(map(str, idx))




def split_form_note(config) -> str:
    """--num-device N: the note for a model whose MLP tpu-mlir will not split ("" when it will)."""
    from ..compiler.memory_plan import WEIGHT_LIMIT

    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    down = int(text_config.hidden_size) * int(getattr(text_config, "intermediate_size", 0) or 0)
    if down > WEIGHT_LIMIT:
        return ""
    return (f"tensor-parallel form: the MLP's down projection has {down} elements, at most tpu-mlir's "
            f"{WEIGHT_LIMIT} (WEIGHT_LIMIT), so its device-parallel pass splits the attention only; tpu-mlir 1.30.2 "
            "then writes multi-device nets no runtime can feed (docs/explanation/tensor-parallel.md)")
