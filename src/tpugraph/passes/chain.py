"""Pass names -> configured pass objects, and a chain of them -> one transformed model plus results."""

from __future__ import annotations

from typing import Any

import onnx

from tpugraph.errors import PassError, UsageError

from .base import GraphPass, PassContext, PassResult
from .dedupe_initializers import DedupeInitializers
from .fix_static_shapes import FixStaticShapes
from .fold_constants import FoldConstants
from .make_tpu_compatible import MakeTpuCompatible
from .remove_identity import RemoveIdentity
from .remove_unused import RemoveUnused
from .rename_kv_io import RenameKvIo
from .simplify_graph import Simplify

PASSES: dict[str, type[GraphPass]] = {cls.name: cls for cls in (
    FixStaticShapes, FoldConstants, Simplify, RemoveIdentity, DedupeInitializers, RemoveUnused, RenameKvIo,
    MakeTpuCompatible,
)}

DEFAULT_CHAIN: tuple[str, ...] = (
    "fix_static_shapes",  # first: every later pass (and onnxsim) sees a fully static graph
    "fold_constants",  # shape chains and constant tables become initializers, size-capped
    "simplify",  # onnxsim fusions and eliminations on the static graph
    "remove_identity",
    "dedupe_initializers",
    "remove_unused",  # after the passes that orphan nodes and initializers
    "rename_kv_io",  # names last but one: nothing after it relies on the contract names
    "tpu_compat",  # last: validates exactly what is written
)


def get_pass(name: str, **options: object) -> GraphPass:
    """A configured pass by registry name; UsageError for an unknown name or option."""
    try:
        cls = PASSES[name]
    except KeyError:
        raise UsageError(f"unknown pass '{name}' (passes: {', '.join(PASSES)})") from None
    return cls(**options)


def default_chain() -> list[GraphPass]:
    return [get_pass(name) for name in DEFAULT_CHAIN]


def _split_names(names: list[str] | str) -> list[str]:
    items = [names] if isinstance(names, str) else list(names)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def resolve_chain(names: list[str] | None = None, skip: list[str] | None = None,
                  options: dict[str, dict[str, Any]] | None = None) -> list[GraphPass]:
    """The chain to run: ``names`` in order (default chain if None) minus ``skip``, each pass configured
    with ``options[name]``.

    Entries may be comma-separated ("simplify,tpu_compat"). Unknown names raise UsageError, and so do
    options for a pass that is not in the chain.
    """
    chosen = list(DEFAULT_CHAIN) if names is None else _split_names(names)
    skipped = _split_names(skip or [])
    options = options or {}
    unknown = [n for n in (*chosen, *skipped, *options) if n not in PASSES]
    if unknown:
        raise UsageError(f"unknown pass {', '.join(repr(n) for n in unknown)} (passes: {', '.join(PASSES)})")
    chain = [n for n in chosen if n not in skipped]
    idle = [n for n in options if n not in chain]
    if idle:
        raise UsageError(f"options given for pass {', '.join(repr(n) for n in idle)}, which is not in the chain")
    return [get_pass(n, **options.get(n, {})) for n in chain]


def parse_pass_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["rename_kv_io.convention=optimum", ...]`` -> ``{"rename_kv_io": {"convention": "optimum"}}``.

    Values are read as JSON where they parse (numbers, true/false, null, lists), else kept as strings.
    """
    import json

    parsed: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or not name or not option:
            raise UsageError(f"--option '{item}' is not of the form PASS.KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        parsed.setdefault(name.strip(), {})[option.strip()] = value
    return parsed


def run_chain(model: onnx.ModelProto, chain: list[GraphPass], ctx: PassContext,
              ran_before: list[str] | tuple[str, ...] = ()) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Run the passes in order. ``model`` itself is never changed.

    At most one copy of the model is made: in-place passes work on a copy the chain owns, passes
    that build a new model hand that one on. A failure raises PassError naming the pass, the
    segment and the passes that ran before it: ``ran_before`` (passes of the same chain that already
    ran on this model, e.g. the part of a chain a weight-swap template shares) and those of ``chain``.
    This is the one place that list is made.
    """
    results: list[PassResult] = []
    current = model
    for index, p in enumerate(chain):
        if ctx.on_pass is not None:
            ctx.on_pass(ctx.segment, p.name, index, len(chain))
        try:
            current, result = p.execute(current, ctx, owned=current is not model)
        except PassError as err:
            raise PassError(p.name, ctx.segment, [*ran_before, *(r.name for r in results)],
                            err.reason) from err.__cause__
        results.append(result)
    return current, results
