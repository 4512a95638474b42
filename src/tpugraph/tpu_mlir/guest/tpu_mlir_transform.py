"""model_transform.py plus the Top-dialect fusions tpu-mlir's ONNX front end does not make, run by the tpu-mlir
venv's Python (it imports nothing of tpugraph: that venv has Python 3.10 and tpu-mlir's own packages only).

    python tpu_mlir_transform.py [--no-fuse] [--skip-onnxsim] [--dynamic-length] <model_transform.py's arguments>

``--skip-onnxsim``: the ONNX file is already folded and simplified (tpugraph's pass chain ran onnxsim on it), so
tpu-mlir's front end does not run its ConstantFolding and onnxsim again (same MLIR, seconds less per file).

tpu-mlir's canonicalizer already turns an exported RMSNorm into ``top.RMSNorm`` and ``x * sigmoid(x)`` into
``top.SiLU``, but leaves rotary embedding and attention as the dozen Slice/Concat/Permute/Tile/MatMul/Softmax ops
the exporter wrote. tpu-mlir's own converter (llm_convert.py) writes ``top.Rope`` and ``top.FAttention`` instead,
which the backend lowers to fused kernels. This script runs model_transform (the ONNX front end, its
canonicalization and, with --test_input, its ONNX-vs-MLIR compare) in this one process, then rewrites the Top MLIR:

* rotary ``x*cos + cat(-x2, x1)*sin`` on ``permute(reshape(q))`` -> ``permute(top.Rope(reshape(q)))`` (contiguous
  halves, the [1, S, H, D] layout llm_convert uses);
* attention ``softmax(q @ k^T * scale + mask) @ v`` with the GQA repeat (Unsqueeze/Tile/Reshape) ->
  ``top.FAttention(q, k, v, mask)`` on [1, S, H, D] tensors; a decode step's
  ``permute(concat(permute(past), permute(new)))`` becomes ``concat(past, new)`` on the sequence axis.

With ``--dynamic-length`` (a prefill net deployed ``--dynamic``, run at the prompt's length): every ``top.Reshape``
that keeps the sequence axis (axis 1, the length of the first input) gets ``-1`` there instead of the static length
the exporter wrote, as llm_convert writes its reshapes. A static ``[1, L, -1, D]`` reshape breaks the net at a shorter
length (the runtime's rope kernel aborts: "broadcast shape must be 1").

Anything else is left exactly as tpu-mlir made it. The rewritten module goes through tpu-mlir's Top passes again
(shape inference, canonicalization: the permute pairs cancel, the replaced ops die). The unfused module is kept
beside it as ``<name>_unfused.mlir``. With --test_input, both modules are run by tpu-mlir's interpreter on that
input and every output must agree (cosine >= 0.99999 and the same argmax-free max error bound); a fusion that does
not hold is an error (exit 3), never silently deployed.

Why this module is long: it is one script that the tpu-mlir venv runs by path, and the two pattern matchers (rotary,
attention) share its small MLIR walking helpers; a split would need sibling imports between guest scripts, which the
host cannot check the way it checks its own.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys

FUSE_TOLERANCE = 0.99999  # cosine, fused vs unfused, f32 interpreter on both


def _arg(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


# ----------------------------------------------------------------------------------------------- matching helpers


class _Graph:
    """The ops of one func, with helpers to read the Top ops' producers, attributes and shapes."""

    def __init__(self, module):
        from mlir.ir import OpView  # noqa: F401  (the bindings must be loaded)

        self.func = module.body.operations[0]
        self.block = self.func.regions[0].blocks[0]
        nones = [op for op in self.block.operations if op.operation.name == "top.None"]
        self.none = nones[0].result if nones else None  # a graph without one has no MatMul/attention either

    @staticmethod
    def name(op) -> str:
        return op.operation.name if op is not None else ""

    @staticmethod
    def producer(value):
        from mlir.ir import OpResult

        return value.owner.opview if OpResult.isinstance(value) else None

    def producer_of(self, value, name: str):
        op = self.producer(value)
        return op if self.name(op) == name else None

    @staticmethod
    def attr(op, key):
        attrs = op.operation.attributes
        return attrs[key] if key in attrs else None

    def ints(self, op, key) -> list[int] | None:
        a = self.attr(op, key)
        if a is None:
            return None
        try:
            from mlir.ir import ArrayAttr

            items = list(ArrayAttr(a)) if ArrayAttr.isinstance(a) else [a]
            return [int(str(x).split(":")[0]) for x in items]
        except (TypeError, ValueError):
            return None

    def number(self, op, key) -> float | None:
        a = self.attr(op, key)
        if a is None:
            return None
        return float(str(a).split(":")[0].strip())

    @staticmethod
    def shape(value) -> list[int]:
        from mlir.ir import RankedTensorType

        return list(RankedTensorType(value.type).shape)

    @staticmethod
    def uses(value) -> int:
        return sum(1 for _ in value.uses)


def _tensor(shape):
    from mlir.ir import F32Type, RankedTensorType

    return RankedTensorType.get(list(shape), F32Type.get())


def _loc(base, suffix: str):
    from mlir.ir import Location

    text = str(base)
    name = text[len('loc("'):-2] if text.startswith('loc("') else "fused"
    return Location.name(f"{name}{suffix}")


class Fuser:
    def __init__(self, module):
        self.g = _Graph(module)
        self.counts = {"rope": 0, "attention": 0}

    def _users(self, value) -> list:
        return [u.owner.opview if hasattr(u.owner, "opview") else u.owner for u in value.uses]

    def _only_user(self, value):
        """The one op that uses ``value``, None when it has none or several (``_Graph.name(None)`` is "")."""
        users = self._users(value)
        return users[0] if len(users) == 1 else None

    # --- rotary -------------------------------------------------------------------------------------------------
    def _rotate_half_of(self, value):
        """x when value == concat(-x[..., D/2:], x[..., :D/2]) along the last axis, else None."""
        g = self.g
        cat = g.producer_of(value, "top.Concat")
        if cat is None or len(cat.operation.operands) != 2:
            return None
        rank = len(g.shape(value))
        axis = g.ints(cat, "axis")
        if axis is None or axis[0] not in (rank - 1, -1):
            return None
        neg = g.producer_of(cat.operation.operands[0], "top.MulConst")
        lo = g.producer_of(cat.operation.operands[1], "top.Slice")
        if neg is None or lo is None or g.number(neg, "const_val") != -1.0:
            return None
        hi = g.producer_of(neg.operation.operands[0], "top.Slice")
        if hi is None:
            return None
        x = lo.operation.operands[0]
        if hi.operation.operands[0] != x:
            return None
        d = g.shape(x)[-1]
        lo_off, hi_off = g.ints(lo, "offset"), g.ints(hi, "offset")
        lo_end, hi_end = g.ints(lo, "ends"), g.ints(hi, "ends")
        steps_ok = all(s == 1 for s in (g.ints(lo, "steps") or [0]) + (g.ints(hi, "steps") or [0]))
        if not (lo_off and hi_off and lo_end and hi_end and steps_ok):
            return None
        if lo_off[-1] != 0 or lo_end[-1] != d // 2 or hi_off[-1] != d // 2 or hi_end[-1] < d:
            return None
        if any(o != 0 for o in lo_off[:-1] + hi_off[:-1]) or g.shape(lo.result)[:-1] != g.shape(x)[:-1]:
            return None
        return x

    def _table(self, value, s: int, d: int):
        """G [1, S, D] when value == unsqueeze(G, axes=[1]) of shape [1, 1, S, D], else None."""
        g = self.g
        unsq = g.producer_of(value, "top.Unsqueeze")
        if unsq is None or g.ints(unsq, "axes") != [1]:
            return None
        table = unsq.operation.operands[0]
        return table if g.shape(table) == [1, s, d] else None

    def rope(self, add) -> bool:
        from mlir.ir import InsertionPoint, StringAttr

        g = self.g
        ops = add.operation.operands
        if len(ops) != 2:
            return False
        muls = [g.producer_of(v, "top.Mul") for v in ops]
        if any(m is None for m in muls):
            return False
        for plain, rotated in (muls, muls[::-1]):
            for rot_i in (0, 1):
                x_rot = self._rotate_half_of(rotated.operation.operands[rot_i])
                if x_rot is None:
                    continue
                sin = rotated.operation.operands[1 - rot_i]
                pa, pb = plain.operation.operands
                x, cos = (pa, pb) if pa == x_rot else (pb, pa) if pb == x_rot else (None, None)
                if x is None:
                    continue
                perm = g.producer_of(x, "top.Permute")
                if perm is None or g.ints(perm, "order") != [0, 2, 1, 3]:
                    continue
                x_shd = perm.operation.operands[0]
                shape = g.shape(x_shd)  # [1, S, H, D]
                if len(shape) != 4 or shape[0] != 1:
                    continue
                _, s, h, d = shape
                cos_t, sin_t = self._table(cos, s, d), self._table(sin, s, d)
                if cos_t is None or sin_t is None:
                    continue
                import mlir.dialects.top as top

                # a use that permutes the result back to [1, S, H, D] (the K cache output) is the Rope itself:
                # the Rope takes that op's name, so the output keeps its name
                back = [u for u in self._users(add.result)
                        if g.name(u) == "top.Permute" and g.ints(u, "order") == [0, 2, 1, 3]]
                with InsertionPoint(add.operation), add.operation.location:
                    c4 = top.ReshapeOp(_tensor([1, s, 1, d]), cos_t, shape=[1, s, 1, d],
                                       loc=_loc(add.operation.location, "_rope_cos")).output
                    s4 = top.ReshapeOp(_tensor([1, s, 1, d]), sin_t, shape=[1, s, 1, d],
                                       loc=_loc(add.operation.location, "_rope_sin")).output
                    r = top.RopeOp(_tensor([1, s, h, d]), x_shd, s4, c4, rope_mode=StringAttr.get("contiguous_halves"),
                                   loc=back[0].operation.location if back else _loc(add.operation.location, "_rope")
                                   ).output
                    p = top.PermuteOp(_tensor([1, h, s, d]), r, order=[0, 2, 1, 3],
                                      loc=add.operation.location).output
                for u in back:
                    u.result.replace_all_uses_with(r)
                add.result.replace_all_uses_with(p)
                self.counts["rope"] += 1
                return True
        return False

    # --- attention ----------------------------------------------------------------------------------------------
    def _heads(self, value, q_heads: int):
        """(X [1, Hkv, Sk, D], Hkv) when value == X repeated to q_heads heads (unsqueeze/tile/reshape) or X itself."""
        g = self.g
        shape = g.shape(value)
        if len(shape) != 4:
            return None
        rs = g.producer_of(value, "top.Reshape")
        if rs is not None:
            tile = g.producer_of(rs.operation.operands[0], "top.Tile")
            if tile is not None:
                unsq = g.producer_of(tile.operation.operands[0], "top.Unsqueeze")
                reps = g.ints(tile, "tile")
                if unsq is not None and g.ints(unsq, "axes") == [2] and reps and len(reps) == 5:
                    x = unsq.operation.operands[0]
                    xs = g.shape(x)
                    if (len(xs) == 4 and reps[:2] == [1, 1] and reps[3:] == [1, 1] and xs[1] * reps[2] == q_heads
                            and xs[2:] == shape[2:]):
                        return x, xs[1]
        if shape[1] == q_heads:
            return value, q_heads
        return None

    def _to_shd(self, value, anchor):
        """value [1, H, S, D] as [1, S, H, D]: undoes a permute or a permuted concat when it can."""
        import mlir.dialects.top as top
        from mlir.ir import InsertionPoint

        g = self.g
        b, h, s, d = g.shape(value)
        perm = g.producer_of(value, "top.Permute")
        if perm is not None and g.ints(perm, "order") == [0, 2, 1, 3]:
            return perm.operation.operands[0]
        cat = g.producer_of(value, "top.Concat")
        if cat is not None and g.ints(cat, "axis") == [2]:
            parts = []
            for v in cat.operation.operands:
                p = g.producer_of(v, "top.Permute")
                if p is None or g.ints(p, "order") != [0, 2, 1, 3]:
                    parts = None
                    break
                parts.append(p.operation.operands[0])
            if parts:
                with InsertionPoint(anchor.operation):
                    return top.ConcatOp(_tensor([b, s, h, d]), parts, axis=1, only_merge=True,
                                        loc=_loc(cat.operation.location, "_shd")).output
        for user in self._users(value):
            # the same permute exists (a K/V output, say): reuse it and so keep its name, which is an output's
            if g.name(user) == "top.Permute" and g.ints(user, "order") == [0, 2, 1, 3]:
                if self._position(user) > self._position(anchor):
                    user.operation.move_before(anchor.operation)  # its operand is defined before the anchor
                return user.result
        with InsertionPoint(anchor.operation):
            return top.PermuteOp(_tensor([b, s, h, d]), value, order=[0, 2, 1, 3],
                                 loc=_loc(anchor.operation.location, f"_shd{self.counts['attention']}_{h}")).output

    def _position(self, op) -> int:
        for i, other in enumerate(self.g.block.operations):
            if other.operation == op.operation:
                return i
        raise ValueError("op not in the block")

    def attention(self, softmax) -> bool:
        import mlir.dialects.top as top
        from mlir.ir import InsertionPoint

        g = self.g
        if g.none is None:
            return False
        if g.ints(softmax, "axis") not in ([3], [-1]) or g.attr(softmax, "log") is not None and str(
                g.attr(softmax, "log")) != "false":
            return False
        add = g.producer_of(softmax.operation.operands[0], "top.Add")
        if add is None or g.uses(softmax.operation.operands[0]) != 1:
            return False
        a0, a1 = add.operation.operands
        scaled = g.producer_of(a0, "top.MulConst")
        mask = a1
        if scaled is None:
            scaled, mask = g.producer_of(a1, "top.MulConst"), a0
        if scaled is None:
            return False
        scale = g.number(scaled, "const_val")
        mm1 = g.producer_of(scaled.operation.operands[0], "top.MatMul")
        if mm1 is None or str(g.attr(mm1, "right_transpose")) != "false" or str(g.attr(mm1, "left_transpose")) != "false":
            return False
        q, kt = mm1.operation.operands[0], mm1.operation.operands[1]
        kt_perm = g.producer_of(kt, "top.Permute")
        if kt_perm is None or g.ints(kt_perm, "order") != [0, 1, 3, 2]:
            return False
        qs = g.shape(q)
        if len(qs) != 4 or qs[0] != 1:
            return False
        _, hq, sq, d = qs
        k_rep = self._heads(kt_perm.operation.operands[0], hq)
        mm2 = self._only_user(softmax.result)
        if k_rep is None or g.name(mm2) != "top.MatMul" or mm2.operation.operands[0] != softmax.result:
            return False
        v_rep = self._heads(mm2.operation.operands[1], hq)
        if v_rep is None:
            return False
        (k, hkv), (v, hkv_v) = k_rep, v_rep
        sk = g.shape(k)[2]
        if hkv != hkv_v or g.shape(v)[2] != sk or g.shape(mask) not in ([1, 1, sq, sk], [1, sq, sk]):
            return False
        perm = self._only_user(mm2.result)
        if g.name(perm) != "top.Permute" or g.ints(perm, "order") != [0, 2, 1, 3]:
            return False
        reshape = self._only_user(perm.result)
        if g.name(reshape) != "top.Reshape" or g.shape(reshape.result) != [1, sq, hq * d]:
            return False
        q4 = self._to_shd(q, reshape)
        k4 = self._to_shd(k, reshape)
        v4 = self._to_shd(v, reshape)
        with InsertionPoint(reshape.operation), reshape.operation.location:
            fa = top.FAttentionOp(_tensor([1, sq, hq * d]), q4, k4, v4, mask, g.none, scale=scale, batch=1,
                                  q_head=hq, kv_head=hkv, dim=d, mq=sq, mk=sk, keep_dims=False,
                                  loc=reshape.operation.location).output
        reshape.result.replace_all_uses_with(fa)
        self.counts["attention"] += 1
        return True

    # --- driver -------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        for op in list(self.g.block.operations):
            if self.g.name(op) == "top.Add":
                self.rope(op)
        for op in list(self.g.block.operations):
            if self.g.name(op) == "top.Softmax":
                self.attention(op)
        self._dead_code()
        return dict(self.counts)

    def _dead_code(self) -> None:
        keep = {"func.return", "top.Input", "top.None"}
        changed = True
        while changed:
            changed = False
            for op in reversed(list(self.g.block.operations)):
                o = op.operation
                if o.name in keep or not o.results:
                    continue
                if all(self.g.uses(r) == 0 for r in o.results):
                    o.erase()
                    changed = True


def free_sequence_axis(module) -> int:
    """--dynamic-length: the Reshapes that keep axis 1 at the net's input length L get -1 there (the dim that was
    -1 gets its static value), so they follow the length the runtime runs the net at. Returns how many changed."""
    from mlir.ir import ArrayAttr, IntegerAttr, IntegerType

    g = _Graph(module)
    args = g.func.regions[0].blocks[0].arguments
    first = g.shape(args[0]) if len(args) else []
    if len(first) < 2:
        return 0
    length = first[1]
    changed = 0
    for op in g.block.operations:
        if g.name(op) != "top.Reshape":
            continue
        shape = g.ints(op, "shape")
        src, dst = g.shape(op.operation.operands[0]), g.shape(op.result)
        if (not shape or len(shape) != len(dst) or len(src) < 2 or len(dst) < 2 or src[1] != length
                or dst[1] != length or shape[1] != length):
            continue
        new = [d if v == -1 else v for v, d in zip(shape, dst)]
        new[1] = -1
        i64 = IntegerType.get_signless(64)
        op.operation.attributes["shape"] = ArrayAttr.get([IntegerAttr.get(i64, v) for v in new])
        changed += 1
    return changed


def _rewrite_file(mlir_file: str, rewrite, changed, step: str, keep: str | None = None):
    """Parse MLIR_FILE (Top dialect), apply ``rewrite(module)``; when ``changed(result)``, write the module back in
    place through tpu-mlir's Top passes (shape inference, canonicalization), keeping the original as ``keep``
    when given. Returns rewrite's result."""
    import mlir.dialects.top  # noqa: F401
    from mlir.ir import Context, Location, Module
    from tpu_mlir.python.utils.mlir_shell import mlir_opt_for_top

    ctx = Context()
    ctx.allow_unregistered_dialects = True
    with ctx, Location.unknown():
        module = Module.parse(open(mlir_file).read())
        result = rewrite(module)
        if not changed(result):
            return result
        text = str(module.operation.get_asm(enable_debug_info=True))
    if keep:
        shutil.copyfile(mlir_file, keep)
    raw = mlir_file[:-len(".mlir")] + f"_{step}_raw.mlir"
    with open(raw, "w") as fh:
        fh.write(text)
    mlir_opt_for_top(raw, mlir_file, log_level="quiet")
    os.remove(raw)
    return result


def free_sequence_axis_file(mlir_file: str) -> int:
    """free_sequence_axis on MLIR_FILE in place (Top dialect; tpu-mlir's Top passes run again on the result)."""
    return _rewrite_file(mlir_file, free_sequence_axis, bool, "dynamic")


def fuse_file(mlir_file: str) -> dict[str, int]:
    """Rewrite MLIR_FILE (Top dialect, as model_transform leaves it) in place; the original is kept as
    ``*_unfused.mlir``. Returns how many of each fusion were made (the file is untouched when none)."""
    return _rewrite_file(mlir_file, lambda module: Fuser(module).run(), lambda counts: any(counts.values()), "fused",
                         keep=mlir_file[:-len(".mlir")] + "_unfused.mlir")


def check_fusion(mlir_file: str, test_input: str) -> float:
    """The lowest cosine between the fused and unfused module's outputs on the test input (tpu-mlir's f32
    interpreter runs both)."""
    import numpy as np
    from tpu_mlir.python.tools.model_runner import free_mlir_module, mlir_inference

    unfused = mlir_file[:-len(".mlir")] + "_unfused.mlir"
    with np.load(test_input) as npz:
        inputs = {k: npz[k] for k in npz.files}
    ref = mlir_inference(inputs, unfused, dump_all=False)
    free_mlir_module()
    out = mlir_inference(inputs, mlir_file, dump_all=False)
    free_mlir_module()
    worst = 1.0
    for name, a in ref.items():
        if name not in out:
            raise RuntimeError(f"fused module lacks output {name}")
        x, y = a.astype(np.float64).ravel(), out[name].astype(np.float64).ravel()
        denom = np.linalg.norm(x) * np.linalg.norm(y)
        cos = float(x @ y / denom) if denom > 0 else float(np.allclose(x, y))
        worst = min(worst, cos)
    return worst


def _model_transform(argv: list[str]) -> None:
    from tpu_mlir.python.tools import model_transform

    sys.argv = ["model_transform.py", *argv]
    runpy.run_path(model_transform.__file__, run_name="__main__")


def main() -> None:
    argv = sys.argv[1:]
    fuse = "--no-fuse" not in argv
    presimplified = "--skip-onnxsim" in argv
    dynamic = "--dynamic-length" in argv
    argv = [a for a in argv if a not in ("--no-fuse", "--skip-onnxsim", "--dynamic-length")]
    import tpu_mlir  # noqa: F401  (sets the tool paths in os.environ)

    if presimplified:
        # The graph is tpugraph's output after its own constant folding and onnxsim: tpu-mlir's front end would
        # fold and simplify it again (about 4 s for a vocabulary table) for the same graph. Should the front end
        # fail on it, it runs once more the usual way.
        try:
            _model_transform([*argv, "--do_onnx_sim", ""])  # an empty string is argparse's False for type=bool
        except BaseException as exc:  # noqa: BLE001  (model_transform ends with SystemExit or any error)
            if isinstance(exc, SystemExit) and exc.code in (0, None):
                raise
            print(f"tpugraph: model_transform without tpu-mlir's onnxsim failed ({exc!r}); again with it",
                  flush=True)
            _model_transform(argv)
    else:
        _model_transform(argv)
    mlir_file = _arg(argv, "--mlir")
    if fuse:
        fuse_and_check(mlir_file, _arg(argv, "--test_input"))
    if dynamic:
        print(f"tpugraph dynamic length: {free_sequence_axis_file(mlir_file)} reshape(s) follow the input length",
              flush=True)


def fuse_and_check(mlir_file: str, test_input: str | None) -> None:
    counts = fuse_file(mlir_file)
    print(f"tpugraph fusion: {', '.join(f'{k} {v}' for k, v in counts.items())}", flush=True)
    if test_input and any(counts.values()):
        worst = check_fusion(mlir_file, test_input)
        ok = worst >= FUSE_TOLERANCE
        print(f"tpugraph fusion check: fused vs unfused outputs, min cosine {worst:.7f} "
              f"({'ok' if ok else 'FAILED'})", flush=True)
        if not ok:
            sys.exit(3)


if __name__ == "__main__":
    main()
