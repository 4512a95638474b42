"""One copy of a tied vocabulary matrix in the combined bmodel.

A model with tied embeddings looks its tokens up in the matrix its ``lm_head`` multiplies by. tpu-mlir stores each
net's coefficients as one block, and ``model_tool --combine`` keeps one copy of blocks that are byte for byte the
same. The contract's ``lm_head`` applies the final norm, so its block holds the norm's weight beside the matrix
(and tpu-mlir's ONNX front end stores a ``Gemm(transB=1)`` weight transposed): it never equals the embedding's, and
the combined bmodel carries the matrix twice (56.6 MB of SmolLM2's 333 MB in BF16; 1 GB for a 152k-vocabulary 7B
model in BF16).

So the compile hands tpu-mlir, for these nets only, the same computation cut in another place (what tpu-mlir's
own llm_convert.py builds): the last layer's nets (``block``, ``block_kv``, ``block_cache`` of layer L-1) end with
the final norm, and ``lm_head`` is the bare ``MatMul(matrix [V,H], hidden^T)`` whose coefficients are exactly the
embedding's. The runtime passes the last block's output to lm_head either way, so the combined bmodel is driven
exactly as before; only the ONNX files handed to tpu-mlir differ from OUT's (they are written into the compile's
work folder). ``compile --no-share-vocab`` keeps the contract's cut in the bmodel too.

``plan_sharing`` decides from the files' structure (no weights loaded: a tied matrix is the same bytes of the same
external file, or the same inline bytes); ``write_shared`` writes the rewritten files.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..contract.manifest import Manifest
from ..contract.segments import SegmentKind

log = logging.getLogger(__name__)

PREFIX = "tpugraph_final_norm/"
# what the final norm of lm_head may be made of to move into a block unchanged (elementwise, or a reduction over
# the hidden axis)
NORM_OPS = {"Pow", "ReduceMean", "Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Cast", "Neg"}
LAST_LAYER_KINDS = (SegmentKind.BLOCK, SegmentKind.BLOCK_KV, SegmentKind.BLOCK_CACHE)


@dataclass(frozen=True)
class VocabSharing:
    lm_head: str  # segment name
    table: str  # the tied matrix's initializer name in lm_head
    last_layer: tuple[str, ...]  # the segments that end with the final norm instead


def rewritten_file(work: str, segment: str) -> str:
    """Where the rewritten ONNX of a segment lies, relative to OUT."""
    return f"{work}/{segment}/{segment}.onnx"


def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _same_tensor(a, a_dir: Path, b, b_dir: Path) -> bool:
    """The same bytes: the same range of the same external file, or equal inline data."""
    from onnx.external_data_helper import uses_external_data

    if list(a.dims) != list(b.dims) or a.data_type != b.data_type:
        return False
    if uses_external_data(a) and uses_external_data(b):
        ea, eb = ({e.key: e.value for e in t.external_data} for t in (a, b))
        return (os.path.realpath(a_dir / ea["location"]) == os.path.realpath(b_dir / eb["location"])
                and ea.get("offset", "0") == eb.get("offset", "0") and ea.get("length") == eb.get("length"))
    if uses_external_data(a) or uses_external_data(b):
        return False
    from onnx import numpy_helper

    return numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()


def _projection(graph):
    """lm_head's Gemm(x, W, transB=1) by an initializer, and the nodes computing x (the final norm)."""
    inits = {t.name: t for t in graph.initializer}
    gemms = [n for n in graph.node if n.op_type == "Gemm" and len(n.input) >= 2 and n.input[1] in inits]
    if len(gemms) != 1:
        return None, None, "lm_head has no single Gemm by a weight matrix"
    gemm = gemms[0]
    attrs = {a.name: a for a in gemm.attribute}
    if (attrs.get("transB") is None or attrs["transB"].i != 1 or (attrs.get("transA") and attrs["transA"].i)
            or (attrs.get("alpha") and attrs["alpha"].f != 1.0) or (len(gemm.input) > 2 and gemm.input[2])):
        return None, None, "lm_head's Gemm is not x @ W^T"
    producer = {o: n for n in graph.node for o in n.output}
    norm, todo = [], [gemm.input[0]]
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None or any(node is n for n in norm):
            continue
        norm.append(node)
        todo.extend(i for i in node.input if i)
    order = {id(n): k for k, n in enumerate(graph.node)}
    norm.sort(key=lambda n: order[id(n)])
    return gemm, norm, ""


def plan_sharing(out_dir: Path, manifest: Manifest, num_device: int) -> tuple[VocabSharing | None, str]:
    """Whether (and for which segments) the compile shares the vocabulary matrix; else why not."""
    if num_device != 1:
        return None, "a multi-device compile splits lm_head across devices"
    by_kind: dict[SegmentKind, list] = {}
    for e in manifest.segments:
        by_kind.setdefault(e.kind, []).append(e)
    if not by_kind.get(SegmentKind.EMBEDDING) or len(by_kind.get(SegmentKind.LM_HEAD, [])) != 1:
        return None, "no embedding net to share with (--embedding-disk, or no lm_head)"
    lm_entry = by_kind[SegmentKind.LM_HEAD][0]
    lm = _load(out_dir / lm_entry.file)
    if len(lm.graph.input) != 1:
        return None, "lm_head takes more than the hidden state"
    gemm, norm, why = _projection(lm.graph)
    if gemm is None:
        return None, why
    if not norm:
        return None, "lm_head has no final norm to move"
    if any(n.op_type not in NORM_OPS for n in norm):
        return None, f"lm_head's final norm has {sorted({n.op_type for n in norm} - NORM_OPS)}"
    table = next(t for t in lm.graph.initializer if t.name == gemm.input[1])
    for e in by_kind[SegmentKind.EMBEDDING] + by_kind.get(SegmentKind.EMBEDDING_CACHE, []):  # at least one: checked above
        emb = _load(out_dir / e.file)
        gathers = [n for n in emb.graph.node if n.op_type == "Gather"]
        inits = {t.name: t for t in emb.graph.initializer}
        if len(gathers) != 1 or gathers[0].input[0] not in inits or not _same_tensor(
                inits[gathers[0].input[0]], (out_dir / e.file).parent, table, (out_dir / lm_entry.file).parent):
            return None, "the embeddings are not tied (the embedding net is not one lookup in lm_head's matrix)"
    layers = [e.layer for e in manifest.segments if e.layer is not None]
    last = max(layers) if layers else None
    ends = [e for e in manifest.segments if e.layer == last]
    if not ends or any(e.kind not in LAST_LAYER_KINDS for e in ends):
        return None, "the last layer has nets other than block/block_kv/block_cache"
    return VocabSharing(lm_entry.name, table.name, tuple(e.name for e in ends)), ""


def _link_external(model, src_dir: Path, dst_dir: Path) -> None:
    """The external data files the model refers to, beside its new place (hard links, else copies)."""
    from onnx.external_data_helper import uses_external_data

    for t in model.graph.initializer:
        if not uses_external_data(t):
            continue
        location = next(e.value for e in t.external_data if e.key == "location")
        target = dst_dir / location
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src_dir / location, target)
        except OSError:
            shutil.copyfile(src_dir / location, target)


def _save(model, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def _norm_nodes(lm, norm, source: str, output: str):
    """Copies of lm_head's final-norm nodes reading ``source`` and writing ``output``, and the initializers
    they read (renamed under PREFIX). A reduction over axis 1 of lm_head's [1, H] input becomes one over the last
    axis, which it is in a block's [1, S, H] output too."""
    import onnx
    from onnx import helper

    inits = {t.name: t for t in lm.graph.initializer}
    hidden = lm.graph.input[0].name
    last = norm[-1].output[0]
    rename = {hidden: source, last: output}
    nodes, tensors = [], []
    for n in norm:
        inputs = []
        for i in n.input:
            if i in inits and i not in rename:
                t = onnx.TensorProto()
                t.CopyFrom(inits[i])
                t.name = PREFIX + i
                tensors.append(t)
                rename[i] = t.name
            inputs.append(rename.get(i, PREFIX + i if i else i))
        outputs = [rename.get(o, PREFIX + o) for o in n.output]
        copy = helper.make_node(n.op_type, inputs, outputs, name=PREFIX + (n.name or outputs[0]), domain=n.domain)
        for a in n.attribute:
            attr = onnx.AttributeProto()
            attr.CopyFrom(a)
            if n.op_type.startswith("Reduce") and a.name == "axes":
                del attr.ints[:]
                attr.ints.extend([-1 if x in (1, -1) else x for x in a.ints])
            copy.attribute.append(attr)
        nodes.append(copy)
    return nodes, tensors


def write_shared(out_dir: Path, manifest: Manifest, sharing: VocabSharing, work: str) -> None:
    """Write the rewritten lm_head and last-layer nets into the work folder (rewritten_file)."""
    import numpy as np
    from onnx import helper, numpy_helper

    entries = {e.name: e for e in manifest.segments}
    lm_path = out_dir / entries[sharing.lm_head].file
    lm = _load(lm_path)
    gemm, norm, _ = _projection(lm.graph)
    hidden = lm.graph.input[0].name
    table = next(t for t in lm.graph.initializer if t.name == gemm.input[1])
    vocab = table.dims[0]

    for name in sharing.last_layer:
        path = out_dir / entries[name].file
        block = _load(path)
        out_name = block.graph.output[0].name
        raw = PREFIX + "input"
        for n in block.graph.node:
            n.output[:] = [raw if o == out_name else o for o in n.output]
            n.input[:] = [raw if i == out_name else i for i in n.input]
        nodes, tensors = _norm_nodes(lm, norm, raw, out_name)
        block.graph.node.extend(nodes)
        block.graph.initializer.extend(tensors)
        target = out_dir / rewritten_file(work, name)
        _link_external(block, path.parent, target.parent)
        _save(block, target)

    # lm_head: the bare projection, the matrix as the left operand as the embedding stores it: [V,H] @ hidden^T
    kept = [n for n in lm.graph.node if n is not gemm and not any(n is m for m in norm)]
    used = {i for n in kept for i in n.input} | {table.name}
    shape = numpy_helper.from_array(np.array([1, vocab], dtype=np.int64), PREFIX + "logits_shape")
    head = [helper.make_node("Transpose", [hidden], [PREFIX + "hidden_t"], perm=[1, 0], name=PREFIX + "transpose"),
            helper.make_node("MatMul", [table.name, PREFIX + "hidden_t"], [PREFIX + "logits_t"], name=PREFIX + "matmul"),
            helper.make_node("Reshape", [PREFIX + "logits_t", shape.name], [gemm.output[0]], name=PREFIX + "reshape")]
    graph = lm.graph
    keep_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits + [shape])
    del graph.node[:]
    graph.node.extend(head + kept)
    produced = {o for n in graph.node for o in n.output}
    values = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(values)
    target = out_dir / rewritten_file(work, sharing.lm_head)
    _link_external(lm, lm_path.parent, target.parent)
    _save(lm, target)
    log.info("vocabulary matrix shared: %s is the bare projection, %s end with the final norm", sharing.lm_head,
             ", ".join(sharing.last_layer))
