"""OUT's lm_head -> lm_head_all: the same net over the L hidden states of a prefill at once (the evaluation's head).

Perplexity needs the logits of every position of a window. Decoding token by token costs a pass through every layer
per position, which on the cmodel is minutes per token; one prefill gives the hidden states of all L positions, and
``lm_head_all`` turns them into [L, V] logits in one run. It is lm_head with its row count set to L: the final norm
reduces over the hidden axis and the projection is a Gemm, so the rows stay independent. With the vocabulary matrix
shared (vocab_sharing.py: the final norm moved into the last layer's nets) it is the bare projection, as lm_head is
there, and its coefficients are the embedding's too.

Only the evaluation uses it: ``tpugraph eval`` runs it beside OUT's segments in onnxruntime, and ``compile
--eval-head`` adds it to the bmodel (``tpugraph eval --bmodel``). OUT itself and its manifest are left as they are.
"""

from __future__ import annotations

from pathlib import Path

from ..contract.manifest import Manifest, SegmentEntry
from ..contract.segments import EVAL_HEAD, SegmentKind, SegmentSpec, eval_head_spec
from ..errors import UsageError
from .vocab_sharing import PREFIX, _link_external, _load, _projection, _save


def prefill_rows(manifest: Manifest) -> int:
    """L, the rows of a prefill (the embedding's input length; block_0's with --embedding-disk)."""
    first = "embedding" if any(s.name == "embedding" for s in manifest.segments) else "block_0"
    return int(manifest.segment(first).inputs[0].shape[1])


def lm_head_entry(manifest: Manifest) -> SegmentEntry:
    """OUT's lm_head, refused when it gives no logits to score (--lm-head-topk)."""
    heads = [e for e in manifest.segments if e.kind == SegmentKind.LM_HEAD]
    if len(heads) != 1:
        raise UsageError("this output has no single lm_head to score with")
    if manifest.options.lm_head_topk:
        raise UsageError("this output's lm_head returns the greedy token only (exported with --lm-head-topk): "
                         "there are no logits to score; export without it to evaluate")
    return heads[0]


def spec(manifest: Manifest) -> SegmentSpec:
    return eval_head_spec(prefill_rows(manifest), int(manifest.model.hidden_size), int(manifest.model.vocab_size))


def _dims(value) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def _set_rows(value, rows: int) -> None:
    value.type.tensor_type.shape.dim[0].dim_value = rows


def write_eval_head(out_dir: Path, manifest: Manifest, target: Path, shared: bool = False) -> SegmentSpec:
    """Write ``lm_head_all`` to ``target`` (its external data linked beside it). ``shared``: the bare projection of
    a compile that shares the vocabulary matrix (the last layer's nets end with the final norm). Returns its spec;
    UsageError when OUT's lm_head gives no logits or does not take several rows."""
    import onnx
    from onnx import helper

    out_dir = Path(out_dir)
    entry = lm_head_entry(manifest)
    want = spec(manifest)
    rows, vocab = want.inputs[0].shape[0], want.outputs[0].shape[1]
    path = out_dir / entry.file
    model = _load(path)
    graph = model.graph
    logits = [o for o in graph.output if _dims(o) == [1, vocab] and o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if len(graph.input) != 1 or len(logits) != 1:
        raise UsageError(f"{entry.file} is not an lm_head of one hidden state in and [1, {vocab}] logits out")
    output = logits[0]
    if shared:
        gemm, norm, why = _projection(graph)
        if gemm is None:
            raise UsageError(f"{entry.file}: {why}")
        hidden = graph.input[0].name
        graph.node.extend([
            helper.make_node("Transpose", [hidden], [PREFIX + "hidden_t"], perm=[1, 0], name=PREFIX + "transpose"),
            helper.make_node("MatMul", [gemm.input[1], PREFIX + "hidden_t"], [PREFIX + "logits_t"],
                             name=PREFIX + "matmul"),
            helper.make_node("Transpose", [PREFIX + "logits_t"], [gemm.output[0]], perm=[1, 0],
                             name=PREFIX + "transpose_back")])
        graph.node.remove(gemm)
    # Only what computes the logits (a greedy lm_head's ArgMax goes, and with it the shared head's norm).
    needed, kept = {output.name}, []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)
    del graph.output[:]
    graph.output.append(output)
    del graph.value_info[:]  # the static shapes of one row
    _set_rows(graph.input[0], rows)
    _set_rows(graph.output[0], rows)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    got = _dims(inferred.graph.output[0])
    if got != [rows, vocab]:
        raise UsageError(f"{entry.file} does not take several rows (its logits come out {got}, not [{rows}, {vocab}])")
    target = Path(target)
    _link_external(model, path.parent, target.parent)
    _save(model, target)
    return want


__all__ = ["EVAL_HEAD", "prefill_rows", "lm_head_entry", "spec", "write_eval_head"]
