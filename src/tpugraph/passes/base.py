"""The pass contract: a configured GraphPass turns a model into a model plus a PassResult."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import onnx

from tpugraph.errors import PassError, PassFailed, UsageError

from . import _graph

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What a pass may know about the segment it runs on."""

    segment: str = "<file>"
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Static shape of every graph input/output by name (SegmentSpec.shapes())."""
    work_dir: Path | None = None
    """Scratch directory for passes that must go through files (models above the protobuf limit)."""
    check_numerics: bool = False
    """Run the model in onnxruntime before and after each pass and fail above ``tolerance``."""
    layer: int | None = None
    """Decoder layer index of a block segment (names like ``past_key_values.{layer}.key``)."""
    kind: str | None = None
    """Segment kind (``tpugraph.contract.SegmentKind`` value), when known."""
    tolerance: float = 1e-4
    """Max abs difference accepted by the ``check_numerics`` comparison."""
    opaque_inputs: frozenset[str] = frozenset()
    """Graph inputs that are weights set aside while the chain runs (not part of the segment's I/O)."""
    on_pass: Callable[[str, str, int, int], None] | None = None
    """Told (segment, pass, index, passes in the chain) as each pass starts: a progress display."""


@dataclass
class PassResult:
    name: str
    modified: bool
    nodes_before: int
    nodes_after: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    # What callers read from a result, typed (also in ``details``, which is what the manifest records):
    mapping: dict[str, str] | None = None
    """Old -> new graph I/O names, from a renaming pass (rename_kv_io)."""
    io_perms: dict[str, dict[str, list[int]]] | None = None
    """Graph I/O whose axes the pass permuted: name -> {"perm": [...]} (rename_kv_io to another layout)."""
    max_abs_diff: dict[str, float] | None = None
    """Per output, the largest difference to the model before the pass (PassContext.check_numerics)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modified": self.modified,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "seconds": round(self.seconds, 4),
            "details": _jsonable(self.details),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = sorted(value) if isinstance(value, set) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


@dataclass(frozen=True)
class NoOptions:
    """The options of a pass that has none."""


class GraphPass:
    """Base class. Subclasses set ``name``, ``summary``, an ``Options`` dataclass (field defaults are the
    pass's defaults) and implement ``apply``, which reads its configuration from ``self.opts``.

    ``apply`` may change the model it is given in place (``in_place = True``, the runner hands it a
    model it owns) or build a new one (``in_place = False``: the model it is given is never changed). It
    returns the model and the counts that describe the change; ``modified`` is derived from a structural
    digest, never guessed.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    defaults: ClassVar[dict[str, Any]] = {}  # derived from ``Options`` (for listings and messages)
    in_place: ClassVar[bool] = True
    # The result depends on which layer the segment is (e.g. I/O names carrying the layer index), so one
    # layer's output of this pass cannot be reused for another layer.
    layer_dependent: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "defaults" in vars(cls) and "Options" not in vars(cls):  # a pass written as a dict of defaults
            cls.Options = make_dataclass(f"{cls.__name__}Options", [
                (k, Any, field(default_factory=lambda v=v: copy.deepcopy(v))) for k, v in cls.defaults.items()],
                frozen=True)
        cls.defaults = {f.name: f.default if f.default is not MISSING else f.default_factory()
                        for f in fields(cls.Options)}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise UsageError(f"pass '{self.name}' has no option {', '.join(map(repr, unknown))} (options: {valid})")
        self.opts = self.Options(**copy.deepcopy(options))
        self.validate()

    def options(self) -> dict[str, Any]:
        """The configured options (defaults included), for the manifest."""
        return _jsonable({f.name: getattr(self.opts, f.name) for f in fields(self.opts)})

    def validate(self) -> None:
        """Check option values; raise UsageError on bad ones."""

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.options().items() if self.defaults.get(k) != v}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"{type(self).__name__}({args})"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, PassResult]:
        """Run the pass alone. ``model`` is never changed; on failure raises PassError."""
        return self.execute(model, ctx, owned=False)

    def execute(self, model: onnx.ModelProto, ctx: PassContext, owned: bool) -> tuple[onnx.ModelProto, PassResult]:
        """Run the pass; with ``owned=True`` an in-place pass may change ``model`` itself."""
        start = time.perf_counter()
        nodes_before = _graph.count_nodes(model)
        digest_before = _graph.digest(model)
        try:
            reference = None
            if ctx.check_numerics:
                from . import _numerics

                reference = _numerics.Reference.compute(model, ctx.work_dir)
            work = model if (owned or not self.in_place) else _graph.copy_model(model)
            out, details = self.apply(work, ctx)
            if reference is not None:
                details["max_abs_diff"] = reference.compare(out, ctx.tolerance, _io_perms(details), ctx.work_dir)
        except PassError:
            raise
        except Exception as exc:  # any failure inside a pass is reported as that pass's failure
            log.debug("pass %s failed on %s", self.name, ctx.segment, exc_info=True)
            raise PassError(self.name, ctx.segment, [], failure_reason(exc)) from exc
        result = PassResult(
            name=self.name,
            modified=_graph.digest(out) != digest_before,
            nodes_before=nodes_before,
            nodes_after=_graph.count_nodes(out),
            seconds=time.perf_counter() - start,
            details=details,
            mapping=details.get("mapping") or None,
            io_perms=_io_perms(details),
            max_abs_diff=details.get("max_abs_diff"),
        )
        log.info("%s on %s: %s nodes %d -> %d in %.2fs %s", self.name, ctx.segment,
                 "modified" if result.modified else "unchanged", result.nodes_before, result.nodes_after,
                 result.seconds, _short(details))
        return out, result


def _io_perms(details: dict[str, Any]) -> dict[str, dict[str, list[int]]] | None:
    perms = details.get("io_perms")
    return perms if isinstance(perms, dict) else None


def _short(details: dict[str, Any]) -> str:
    text = str(_jsonable(details))
    return text if len(text) < 300 else text[:297] + "..."


def failure_reason(exc: BaseException) -> str:
    """One line: the PassFailed message as is, other errors prefixed with their type."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, PassFailed):
        return first or "failed"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
