"""A text -> the perplexity of OUT's segments (onnxruntime) or of its bmodel (cmodel) beside transformers' own on the
same windows, and how often their next-token predictions agree (tpugraph eval).

The text is tokenized with OUT's tokenizer and cut into consecutive windows of ``window_length`` tokens; each window
is scored on its own, from position 0. transformers' float32 model runs one forward per window; the system under test
runs one prefill per window (as the runtime does, ``block_i`` on the window's tokens) and ``lm_head_all``
(compiler/eval_head.py) on the last block's output: the logits of every position in one run, which keeps a window
to one pass through the layers even on the cmodel. Position t's logits score token t + 1, so a window of W tokens
scores W - 1 predictions. Perplexity is exp of the mean negative log-likelihood over every scored position of every
window; top-1 agreement is the share of those positions where the two argmaxes are the same token.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..contract.manifest import Manifest, read_manifest
from ..contract.segments import EVAL_HEAD
from ..errors import UsageError, VerificationError

log = logging.getLogger(__name__)

BUILTIN_TEXT = "pride_and_prejudice_1-3.txt"  # Jane Austen, 1813: public domain, shipped in proof/data
DEFAULT_WINDOWS = 4


def builtin_text() -> str:
    """The text that ships with tpugraph: chapters 1 to 3 of Pride and Prejudice."""
    return (resources.files("tpugraph.proof") / "data" / BUILTIN_TEXT).read_text(encoding="utf-8")


def read_text(text: str | Path | None, builtin: bool) -> tuple[str, str]:
    """(what the text is called in the report, the text) of ``--text FILE`` or ``--builtin``."""
    if (text is None) == (not builtin):
        raise UsageError("give exactly one of --text FILE or --builtin")
    if builtin:
        return f"builtin ({BUILTIN_TEXT})", builtin_text()
    path = Path(text)
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"'{path}' does not exist", option="text") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"'{path}' cannot be read as UTF-8 text: {getattr(exc, 'strerror', None) or exc}",
                         option="text") from None
    if not content.strip():
        raise UsageError(f"'{path}' is empty", option="text")
    return str(path), content


def windows_of(ids: list[int], window_length: int, count: int) -> list[list[int]]:
    """The first ``count`` consecutive whole windows of ``ids`` (fewer when the text holds fewer)."""
    whole = len(ids) // window_length
    return [ids[i * window_length:(i + 1) * window_length] for i in range(min(count, whole))]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


@dataclass
class WindowScore:
    """One window: the summed negative log-likelihood of its W - 1 next tokens under each model, and at how many
    of those positions the two models' top-1 tokens are the same."""

    positions: int
    reference_nll: float
    nll: float
    agree: int


def score_window(window: list[int], reference_logits: np.ndarray, logits: np.ndarray) -> WindowScore:
    """``*_logits``: [W, V], position t predicting token t + 1 (the last position predicts nothing scored)."""
    n = len(window)
    targets = np.asarray(window[1:], dtype=np.int64)
    rows = np.arange(n - 1)
    ref = log_softmax(reference_logits[: n - 1])
    got = log_softmax(logits[: n - 1])
    agree = int((ref.argmax(axis=-1) == got.argmax(axis=-1)).sum())
    return WindowScore(n - 1, float(-ref[rows, targets].sum()), float(-got[rows, targets].sum()), agree)


@dataclass
class EvalReport:
    text: str  # the file, or "builtin (...)"
    text_tokens: int
    window_length: int
    backend: str  # what ran OUT: onnxruntime, or the bmodel on the cmodel
    mode: str  # the export's dtype, or the bmodel's quantization
    windows: list[WindowScore] = field(default_factory=list)
    reference_seconds: float = 0.0
    backend_seconds: float = 0.0
    reference: str = "transformers (float32)"

    @property
    def positions(self) -> int:
        return sum(w.positions for w in self.windows)

    @property
    def reference_perplexity(self) -> float:
        return float(np.exp(sum(w.reference_nll for w in self.windows) / self.positions))

    @property
    def perplexity(self) -> float:
        return float(np.exp(sum(w.nll for w in self.windows) / self.positions))

    @property
    def relative_difference(self) -> float:
        """(perplexity - transformers') / transformers'."""
        return self.perplexity / self.reference_perplexity - 1.0

    @property
    def top1_agreement(self) -> float:
        return sum(w.agree for w in self.windows) / self.positions

    def to_json(self) -> dict:
        return {"text": self.text, "text_tokens": self.text_tokens, "windows": len(self.windows),
                "window_length": self.window_length, "positions": self.positions, "backend": self.backend,
                "mode": self.mode, "reference": self.reference, "reference_perplexity": self.reference_perplexity,
                "perplexity": self.perplexity, "relative_difference": self.relative_difference,
                "top1_agreement": self.top1_agreement, "reference_seconds": self.reference_seconds,
                "backend_seconds": self.backend_seconds}


def reference_logits(model, window: list[int]) -> np.ndarray:
    """transformers' logits [W, V] of one window, in float32."""
    import torch

    ids = torch.tensor([window], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits[0].float().numpy()


def head_logits(runtime, window: list[int], rows: int) -> np.ndarray:
    """The system under test's logits [W, V] of one window: a prefill, then lm_head_all on its L rows."""
    hidden, _ = runtime.prefill_states(window)
    states = np.zeros((rows, hidden.shape[-1]), dtype=np.float32)
    states[: hidden.shape[1]] = np.asarray(hidden[0], dtype=np.float32)
    (logits,) = runtime.run(EVAL_HEAD, states)[:1]
    return np.asarray(logits, dtype=np.float32)[: len(window)]


def _check_bmodel_head(backend, manifest: Manifest, rows: int) -> None:
    info = backend.nets.get(EVAL_HEAD)
    if info is None:
        raise UsageError(f"{backend.bmodel.name} has no {EVAL_HEAD} net to score every position with: compile OUT "
                         "with --eval-head (tpugraph compile OUT --eval-head --quantize MODE)", option="bmodel")
    want = [rows, int(manifest.model.hidden_size)]
    if list(info.inputs[0]["shape"]) != want:
        raise VerificationError(f"{backend.bmodel.name}'s {EVAL_HEAD} takes {info.inputs[0]['shape']}, not {want}: "
                                "it was not compiled from this output")


def evaluate(out: str | Path, text: str | Path | None = None, builtin: bool = False, windows: int = DEFAULT_WINDOWS,
             window_length: int | None = None, bmodel: str | Path | None = None, tpu_mlir: str | Path | None = None,
             model_path: str | None = None, stream_reference: bool | None = None) -> EvalReport:
    """Perplexity and top-1 agreement of OUT's segments in onnxruntime (or of ``bmodel`` on the cmodel) against
    transformers' float32 model on the same windows of ``text`` (a file) or of the built-in text. ``windows``: how
    many windows to score (fewer when the text holds fewer); ``window_length``: tokens per window, 2..L (default L,
    the prefill nets' input length). A bmodel needs the evaluation head: compile OUT with ``--eval-head``."""
    from ..runtime.loop import SegmentRuntime
    from ..source.tokenizer import load_output_tokenizer
    from .verify import _source_folder, bmodel_mode, reference_model

    out_dir = Path(out)
    manifest = read_manifest(out_dir)
    if not manifest.complete:
        raise VerificationError(f"'{out_dir}' is an unfinished export (manifest marked incomplete); rerun the export")
    name, content = read_text(text, builtin)
    from ..compiler.eval_head import lm_head_entry, prefill_rows

    lm_head_entry(manifest)  # refuses an lm_head without logits before anything slow
    rows = prefill_rows(manifest)
    length = rows if window_length is None else window_length
    if not 2 <= length <= rows:
        raise UsageError(f"must be within 2..{rows} (the prefill nets' input length; got {length})",
                         option="window_length")
    if windows < 1:
        raise UsageError(f"must be >= 1 (got {windows})", option="windows")
    tokenizer = load_output_tokenizer(out_dir, manifest, instead="eval reads the text with it")
    ids = [int(t) for t in tokenizer(content)["input_ids"]]
    chosen = windows_of(ids, length, windows)
    if not chosen:
        raise UsageError(f"the text is {len(ids)} tokens, shorter than one window of {length}: give a longer text "
                         "or a smaller --window-length")
    if bmodel is not None:
        from ..runtime.backends.bmodel_backend import BmodelBackend

        engine = BmodelBackend(bmodel, manifest, tpu_mlir)
        mode = "bmodel-" + bmodel_mode(engine.bmodel, engine.activation_dtype)
        work = None
        try:
            _check_bmodel_head(engine, manifest, rows)
        except BaseException:
            engine.close()
            raise
    else:
        from ..compiler.eval_head import write_eval_head
        from ..runtime.backends.onnxruntime_backend import OnnxBackend

        engine = OnnxBackend(out_dir, manifest)
        mode = str(manifest.options.dtype)
        work = Path(tempfile.mkdtemp(prefix=".tpugraph-eval-", dir=out_dir))  # beside OUT's data files (linked)
        try:
            write_eval_head(out_dir, manifest, work / f"{EVAL_HEAD}.onnx")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        engine.add_net(EVAL_HEAD, work / f"{EVAL_HEAD}.onnx")
    report = EvalReport(text=name, text_tokens=len(ids), window_length=length, backend=engine.name, mode=mode)
    try:
        runtime = SegmentRuntime(out_dir, manifest, backend=engine)
        got = []
        t0 = time.perf_counter()
        for i, window in enumerate(chosen):
            got.append(head_logits(runtime, window, rows))
            log.info("window %d/%d scored by %s", i + 1, len(chosen), engine.name)
        report.backend_seconds = time.perf_counter() - t0
    finally:
        engine.close()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    source = _source_folder(manifest, model_path)
    if stream_reference is None:
        from .reference import should_stream

        stream_reference = should_stream(source)
    t0 = time.perf_counter()
    model = reference_model(source, stream_reference)
    for window, logits in zip(chosen, got):
        report.windows.append(score_window(window, reference_logits(model, window), logits))
    report.reference_seconds = time.perf_counter() - t0
    if stream_reference:
        report.reference = "transformers (float32, layers streamed)"
    return report
