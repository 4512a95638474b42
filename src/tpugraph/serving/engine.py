"""One device, many requests: a bounded FIFO queue in front of a single worker thread, the only code that drives the
backend. Requests are checked (window, prefill nets, sample head) before they queue; each one streams its text back
through a callback; the KV cache stays between requests, so a conversation's next turn prefills only its new part."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..contract.manifest import Manifest, read_manifest
from ..errors import EXIT_USAGE, TpugraphError, UsageError, VerificationError
from ..runtime.backends import SegmentBackend
from ..runtime.conversation import check_conversation
from ..runtime.loop import KvCache, SegmentRuntime, StopGeneration
from ..runtime.sampling import SamplingParams, sample_head_of
from ..runtime.text import TextStream, stop_ids
from ..source.tokenizer import load_output_tokenizer
from .stop_strings import StopStrings

log = logging.getLogger(__name__)


class RequestRefused(TpugraphError):
    """A request this output cannot serve as asked (too long for SEQ, no sample head...): the client's fault."""

    exit_code = EXIT_USAGE


class PromptTooLong(RequestRefused):
    """The prompt does not fit the window (SEQ) or the prefill nets (L without --history-kv)."""


class QueueFull(TpugraphError):
    """Every place in the queue is taken: the client should retry later."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams | None = None  # None: greedy, as tpugraph run
    stop: list[str] = field(default_factory=list)


@dataclass
class Finished:
    text: str  # the whole reply, stop string cut
    finish_reason: str  # stop (EOS or a stop string) | length (max_tokens or the window) | cancelled
    prompt_tokens: int
    completion_tokens: int  # tokens generated, EOS and the one that completed a stop string included
    cached_tokens: int  # prompt tokens whose KV rows came from the previous request
    seconds: float
    error: Exception | None = None  # the device failed (the request's answer is a server error)


# What a job reports, from the worker thread: a piece of text (str), then one Finished.
Emit = Callable[[object], None]


class Job:
    def __init__(self, request: GenerationRequest, emit: Emit):
        self.request = request
        self.emit = emit
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client is gone: a queued job is dropped, a running one stops at its next token."""
        self.cancelled.set()


class Engine:
    """OUT's runtime behind a queue. ``start`` the worker, ``submit`` jobs from any thread, ``close`` at the end
    (queued jobs are cancelled, the backend closed)."""

    def __init__(self, out: str | Path, backend: SegmentBackend, max_queue: int = 16,
                 manifest: Manifest | None = None):
        out_dir = Path(out)
        manifest = manifest or read_manifest(out_dir)
        if not manifest.complete:
            raise VerificationError(f"'{out_dir}' is an unfinished export (manifest marked incomplete); "
                                    "rerun the export")
        if max_queue < 0:
            raise UsageError(f"must be >= 0 (got {max_queue})", option="max_queue")
        self.out_dir = out_dir
        self.manifest = manifest
        self.max_queue = max_queue
        self.tokenizer = load_output_tokenizer(out_dir, manifest, instead="serving text needs one")
        self.eos = stop_ids(out_dir, manifest, self.tokenizer)
        self.runtime = SegmentRuntime(out_dir, manifest, backend=backend)
        self.seq = self.runtime.seq
        self.vocab = int(manifest.model.vocab_size)
        self.backend_name = backend.name
        self.cache = KvCache()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._busy = False
        self._current: Job | None = None
        self._closed = False
        self._worker: threading.Thread | None = None
        self.served: deque[Finished] = deque(maxlen=256)  # the last finished jobs, oldest first

    @classmethod
    def open(cls, out: str | Path, backend: str = "onnx", bmodel: str | Path | None = None,
             venv: str | Path | None = None, max_queue: int = 16) -> "Engine":
        from ..runtime.backends.choice import open_backend

        out_dir = Path(out)
        manifest = read_manifest(out_dir)
        engine = open_backend(backend, out_dir, manifest, bmodel, venv)
        try:
            return cls(out_dir, engine, max_queue, manifest)
        except BaseException:
            engine.close()
            raise

    # ---- checks, in the caller's thread: pure data, the backend untouched

    def check_prompt(self, ids: list[int], max_tokens: int | None) -> int:
        """The number of tokens to generate for ``ids``: ``max_tokens`` or (None) as many as the window allows,
        at most that; RequestRefused when the prompt cannot be served."""
        if not ids:
            raise RequestRefused("the prompt is empty")
        if len(ids) > self.seq:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens, longer than this model's window "
                                 f"(SEQ={self.seq} tokens, prompt and reply)")
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise RequestRefused(f"token id(s) {bad[:5]} outside the vocabulary (0..{self.vocab - 1})")
        try:
            check_conversation(self.manifest, len(ids), 1)
        except UsageError as exc:
            raise PromptTooLong(str(exc)) from None
        if max_tokens is not None and max_tokens < 1:
            raise RequestRefused(f"max_tokens must be >= 1 (got {max_tokens})")
        room = self.seq - len(ids) + 1  # the last token is never fed back: it needs no row
        return room if max_tokens is None else min(max_tokens, room)

    def sampling(self, temperature: float | None, top_p: float | None, seed: int | None,
                 top_k: int | None = None, penalty: float | None = None) -> SamplingParams | None:
        """None (greedy) unless the request asks to sample (temperature > 0); else its parameters, checked
        against OUT's sample head. Without a seed the draws differ from request to request."""
        if not temperature:
            return None
        try:
            net = sample_head_of({s.name for s in self.manifest.segments}, self.out_dir)
        except UsageError:
            raise RequestRefused("temperature > 0 samples, and this model has no sample head (exported without "
                                 "--sample-head): send temperature 0 for greedy decoding") from None
        k = int(self.manifest.segment(net).outputs[0].shape[-1])
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        params = SamplingParams(temperature=temperature, top_p=1.0 if top_p is None else top_p,
                                top_k=k if top_k is None else top_k, penalty=1.0 if penalty is None else penalty,
                                seed=seed)
        try:
            return params.check(k)
        except UsageError as exc:
            raise RequestRefused(f"{exc.option or ''} {exc.problem}".strip()) from None

    # ---- the queue

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, request: GenerationRequest, emit: Emit) -> Job:
        """Queue ``request``; QueueFull when ``max_queue`` requests already wait."""
        job = Job(request, emit)
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are waiting for the device (--max-queue "
                                f"{self.max_queue}): retry later")
            self._waiting += 1
            self._queue.put(job)
        return job

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="tpugraph-device", daemon=True)
            self._worker.start()

    def close(self) -> None:
        """Stop: the running job at its next token, the queued ones before they start; then the backend."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._current is not None:
                self._current.cancel()
            self._queue.put(None)
        if self._worker is not None:
            self._worker.join()
        else:
            self._drain()
        self.runtime.close()

    def _drain(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.cancel()
                self._finish(job, Finished("", "cancelled", len(job.request.prompt_ids), 0, 0, 0.0))

    # ---- the worker: the only thread that drives the backend

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                if job is None:
                    break
                self._waiting -= 1
                self._busy = True
                self._current = job
                if self._closed:
                    job.cancel()
            try:
                if job.cancelled.is_set():
                    self._finish(job, Finished("", "cancelled", len(job.request.prompt_ids), 0, 0, 0.0))
                else:
                    self._finish(job, self._generate(job))
            finally:
                with self._lock:
                    self._busy = False
                    self._current = None
        self._drain()

    def _finish(self, job: Job, done: Finished) -> None:
        self.served.append(done)
        job.emit(done)

    def _generate(self, job: Job) -> Finished:
        req = job.request
        t0 = time.perf_counter()
        stops = StopStrings(req.stop)

        def on_text(piece: str) -> None:
            shown = stops.feed(piece)
            if shown:
                job.emit(shown)

        stream = TextStream(self.tokenizer, on_text)

        def on_token(token: int) -> None:
            stream(token)
            if stops.stopped or job.cancelled.is_set():
                raise StopGeneration

        reused = self.runtime.reusable_prefix(self.cache, req.prompt_ids)
        try:
            self.runtime.use_sampling(req.sampling)
            trace = self.runtime.generate(req.prompt_ids, req.max_tokens, self.eos, on_token=on_token,
                                          cache=self.cache)
        except Exception as exc:  # the device failed mid-way: its cache cannot be trusted
            log.exception("generation failed")
            self.cache.reset()
            return Finished(stops.text[: stops.shown], "error", len(req.prompt_ids), 0, 0,
                            time.perf_counter() - t0, error=exc)
        finally:
            self.runtime.use_sampling(None)
        if not job.cancelled.is_set() and not stops.stopped:
            stream.finish(trace.tokens)  # the text's unshown end (it may still complete a stop string)
            rest = stops.flush() if not stops.stopped else ""
            if rest:
                job.emit(rest)
        if job.cancelled.is_set():
            reason = "cancelled"
        elif stops.stopped or trace.tokens[-1] in self.eos:
            reason = "stop"
        else:
            reason = "length"
        return Finished(stops.text[: stops.shown], reason, len(req.prompt_ids), len(trace.tokens), reused,
                        time.perf_counter() - t0)
