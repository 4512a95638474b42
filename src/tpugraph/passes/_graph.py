"""Graph helpers the passes share: counting, digests, renaming, dead-code removal, shape inference.

Why this module is long: these are the small graph helpers every pass shares (walking, renaming, digests,
shape inference, external data); splitting them by theme would make each pass import from three places."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

LARGE_MODEL_BYTES = 1_800_000_000
"""Above this a model is never serialised into one protobuf (hard limit 2 GB): passes go through files."""

_SKELETON_MIN_BYTES = 1 << 16
_SHAPE_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL})
_DIGEST_FULL_BYTES = 1 << 20
_DIGEST_SAMPLES = 64
_DIGEST_WINDOW = 64


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    raise ValueError("the model imports no default-domain ('ai.onnx') opset")


def set_default_opset(model: onnx.ModelProto, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = version
            return
    model.opset_import.add(domain="", version=version)


def count_nodes(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Size of a tensor's payload, without decoding it (works for external data too)."""
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    n = 1
    for d in t.dims:
        n *= d
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return len(t.raw_data)
    return n * itemsize


def model_nbytes(model: onnx.ModelProto) -> int:
    """Approximate serialised size: the tensor payloads dominate, the rest is a few KB per node."""
    total = sum(tensor_nbytes(t) for t in model.graph.initializer)
    for node in iter_nodes(model.graph):
        for attr in node.attribute:
            if attr.HasField("t"):
                total += tensor_nbytes(attr.t)
    return total + 512 * len(model.graph.node)


def is_large(model: onnx.ModelProto, limit: int | None = None) -> bool:
    return model_nbytes(model) > (LARGE_MODEL_BYTES if limit is None else limit)


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in iter_graphs(graph):
        yield from g.node


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def names_read_by_subgraphs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's subgraphs read (implicit inputs)."""
    used: set[str] = set()
    for g in subgraphs(node):
        defined = {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            defined.update(n.output)
        for n in iter_nodes(g):
            used.update(i for i in n.input if i)
        used.update(o.name for o in g.output)
        used -= defined
    return used


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor a node reads, explicit inputs and subgraph captures."""
    reads = {i for i in node.input if i}
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        reads |= names_read_by_subgraphs(node)
    return reads


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: node for node in graph.node for o in node.output if o}


def graph_input_names(graph: onnx.GraphProto) -> list[str]:
    """Graph inputs that are real inputs (IR < 4 files also list initializers as inputs)."""
    inits = {t.name for t in graph.initializer}
    return [v.name for v in graph.input if v.name not in inits]


def replace_uses(graph: onnx.GraphProto, old: str, new: str) -> int:
    """Make every reader of ``old`` (explicit inputs and subgraph captures) read ``new``."""
    count = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
                count += 1
        for g in subgraphs(node):
            if _defines(g, old):
                continue
            count += replace_uses(g, old, new)
            for out in g.output:
                if out.name == old:
                    out.name = new
    return count


def _defines(graph: onnx.GraphProto, name: str) -> bool:
    if any(v.name == name for v in graph.input) or any(t.name == name for t in graph.initializer):
        return True
    return any(name in n.output for n in graph.node)


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere in the graph: producer, readers, graph I/O, initializer, value_info."""
    replace_uses(graph, old, new)
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for seq in (graph.input, graph.output, graph.value_info):
        for v in seq:
            if v.name == old:
                v.name = new
    for t in graph.initializer:
        if t.name == old:
            t.name = new


def all_tensor_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for g in iter_graphs(graph):
        names.update(v.name for v in g.input)
        names.update(v.name for v in g.output)
        names.update(v.name for v in g.value_info)
        names.update(t.name for t in g.initializer)
        for n in g.node:
            names.update(n.input)
            names.update(n.output)
    names.discard("")
    return names


def unique_name(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def prune_dead_nodes(graph: onnx.GraphProto) -> int:
    """Remove nodes none of whose outputs reach a graph output. Returns how many were removed."""
    live = {o.name for o in graph.output}
    dead: list[int] = []
    for idx in reversed(range(len(graph.node))):
        node = graph.node[idx]
        if any(o in live for o in node.output if o):
            live |= node_reads(node)
        else:
            dead.append(idx)
    for idx in dead:  # descending, so earlier indices stay valid
        del graph.node[idx]
    return len(dead)


def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def drop_stale_value_info(graph: onnx.GraphProto) -> int:
    """Remove value_info entries for tensors no node produces any more."""
    produced = {o for n in graph.node for o in n.output}
    stale = [v for v in graph.value_info if v.name not in produced]
    for v in stale:
        graph.value_info.remove(v)
    return len(stale)


def constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and outputs of ``Constant`` nodes that hold a tensor value."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            value = constant_node_value(node)
            if value is not None:
                out[node.output[0]] = value
    return out


def constant_node_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    attr = node.attribute[0]
    if attr.name == "value":
        return attr.t
    if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
        arr = np.array(onnx.helper.get_attribute_value(attr),
                       dtype=np.float32 if "float" in attr.name else np.int64)
        return numpy_helper.from_array(arr, node.output[0])
    return None


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def tensor_bytes(t: onnx.TensorProto) -> bytes:
    """The payload bytes of an in-memory tensor (raw or typed fields), for exact comparison."""
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is declared (I/O, value_info, initializers, Constants)."""
    g = model.graph
    out: dict[str, int] = {}
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            out[v.name] = v.type.tensor_type.elem_type
    for name, t in constant_tensors(g).items():
        out[name] = t.data_type
    return out


def static_shape(v: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """The shape of a value if every dim is a concrete number, else None."""
    if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
        return None
    dims = v.type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def skeleton(model: onnx.ModelProto, min_bytes: int | None = None) -> onnx.ModelProto:
    """A copy of the model whose large tensors carry dims and type but no payload.

    Shape inference needs only dims and types of weights, so running it on the skeleton keeps
    big models far below the 2 GB protobuf limit and avoids copying their weights.
    """
    out = onnx.ModelProto()
    for desc, value in model.ListFields():
        if desc.name == "graph":
            continue
        _copy_field(out, desc, value)
    for desc, value in model.graph.ListFields():
        if desc.name == "initializer":
            continue
        _copy_field(out.graph, desc, value)
    limit = _SKELETON_MIN_BYTES if min_bytes is None else min_bytes
    for t in model.graph.initializer:
        # integer tensors may be shapes, axes or indices that inference reads: always kept whole
        if tensor_nbytes(t) >= limit and not is_external(t) and t.data_type not in _SHAPE_TYPES:
            stub = out.graph.initializer.add()
            stub.name = t.name
            stub.data_type = t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="__tpugraph_skeleton__")
        else:
            out.graph.initializer.add().CopyFrom(t)
    return out


def _is_repeated(desc) -> bool:
    flag = getattr(desc, "is_repeated", None)  # protobuf >= 5.28; `label` is gone in 7
    return bool(flag) if flag is not None else desc.label == desc.LABEL_REPEATED


def _copy_field(dst, desc, value) -> None:
    if _is_repeated(desc):
        getattr(dst, desc.name).extend(value)
    elif desc.type == desc.TYPE_MESSAGE:
        getattr(dst, desc.name).CopyFrom(value)
    else:
        setattr(dst, desc.name, value)


def infer_shapes(model: onnx.ModelProto, strict: bool, data_prop: bool = True) -> None:
    """Run ONNX shape inference and store its value_info (and refined graph outputs) in ``model``.

    Works on the skeleton, so it is safe for models above the protobuf limit.
    """
    sk = skeleton(model)
    del sk.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(sk, check_type=strict, strict_mode=strict, data_prop=data_prop)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    by_name = {o.name: o for o in inferred.graph.output}
    for out in model.graph.output:
        if out.name in by_name:
            out.type.CopyFrom(by_name[out.name].type)


def digest(model: onnx.ModelProto) -> str:
    """A fingerprint of what the model computes and its interface, for a pass's ``modified`` flag.

    Covers IR version, opsets, graph I/O (names, types, dims), nodes (ops, wiring, attributes),
    initializers and local functions; not annotations (value_info, names of nodes, doc strings,
    metadata) nor how a tensor happens to be encoded. Hashing every byte of multi-GB weights after
    every pass would cost minutes per model: weights above 1 MB contribute name, type, dims, size
    and 64 evenly spaced 64-byte windows.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(f"ir={model.ir_version}".encode())
    opsets = sorted(("" if o.domain == "ai.onnx" else o.domain, o.version) for o in model.opset_import)
    h.update(repr(opsets).encode())
    _digest_graph(h, model.graph)
    for f in model.functions:
        h.update(f"F{f.domain}::{f.name}|{list(f.input)}|{list(f.output)}".encode())
        for node in f.node:
            _digest_node(h, node)
    return h.hexdigest()


def _digest_graph(h, graph: onnx.GraphProto) -> None:
    for kind, values in (("I", graph.input), ("O", graph.output)):
        for v in values:
            h.update(f"{kind}{v.name}|{_type_repr(v.type)}".encode())
    for t in graph.initializer:
        _digest_tensor(h, t)
    for node in graph.node:
        _digest_node(h, node)


def _type_repr(t: onnx.TypeProto) -> str:
    if not t.HasField("tensor_type"):
        return t.SerializeToString(deterministic=True).hex()
    tt = t.tensor_type
    if not tt.HasField("shape"):
        return f"{tt.elem_type}[*]"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return f"{tt.elem_type}[{','.join(dims)}]"


def _digest_node(h, node: onnx.NodeProto) -> None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    h.update(f"N{domain}::{node.op_type}|{list(node.input)}|{list(node.output)}".encode())
    for attr in sorted(node.attribute, key=lambda a: a.name):
        h.update(f"A{attr.name}|{attr.type}|{attr.ref_attr_name}".encode())
        if attr.type == onnx.AttributeProto.GRAPH:
            _digest_graph(h, attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                _digest_graph(h, g)
        elif attr.type == onnx.AttributeProto.TENSOR:
            _digest_tensor(h, attr.t)
        elif attr.type == onnx.AttributeProto.TENSORS:
            for t in attr.tensors:
                _digest_tensor(h, t)
        elif not attr.ref_attr_name:
            h.update(repr(onnx.helper.get_attribute_value(attr)).encode())


def _digest_tensor(h, t: onnx.TensorProto) -> None:
    h.update(f"T{t.name}|{t.data_type}|{list(t.dims)}".encode())
    if is_external(t):
        h.update(str(sorted((e.key, e.value) for e in t.external_data)).encode())
        return
    if t.data_type == onnx.TensorProto.STRING:
        h.update(repr(list(t.string_data)).encode())
        return
    data = tensor_bytes(t)
    n = len(data)
    h.update(str(n).encode())
    if n <= _DIGEST_FULL_BYTES:
        h.update(data)
        return
    step = n // _DIGEST_SAMPLES
    crc = 0
    for i in range(_DIGEST_SAMPLES):
        crc = zlib.crc32(data[i * step: i * step + _DIGEST_WINDOW], crc)
    crc = zlib.crc32(data[-_DIGEST_WINDOW:], crc)
    h.update(crc.to_bytes(4, "little"))


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None, min_bytes: int = 1024) -> None:
    """Save with tensors >= ``min_bytes`` in one external data file, without changing or copying ``model``.

    ``onnx.save_model(save_as_external_data=True)`` rewrites the tensors of the model it is given;
    here only the small skeleton is built, the payloads are streamed straight to the data file.
    """
    path = Path(path)
    location = location or f"{path.name}.data"
    out = onnx.ModelProto()
    for desc, value in model.ListFields():
        if desc.name != "graph":
            _copy_field(out, desc, value)
    for desc, value in model.graph.ListFields():
        if desc.name != "initializer":
            _copy_field(out.graph, desc, value)
    with open(path.parent / location, "wb") as f:
        for t in model.graph.initializer:
            if is_external(t):
                raise ValueError(f"initializer '{t.name}' refers to external data that was not loaded")
            if tensor_nbytes(t) < min_bytes or t.data_type == onnx.TensorProto.STRING:
                out.graph.initializer.add().CopyFrom(t)
                continue
            payload = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            offset = f.tell()
            f.write(payload)
            stub = out.graph.initializer.add()
            stub.name = t.name
            stub.data_type = t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value=location)
            stub.external_data.add(key="offset", value=str(offset))
            stub.external_data.add(key="length", value=str(len(payload)))
    onnx.save_model(out, path)
