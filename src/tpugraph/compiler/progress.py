"""Compile progress as typed events: each step's start and end, with a count of finished steps that never
passes the total (the plan's steps plus the end-to-end check), however many segments compile at once."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StepEvent:
    segment: str  # "" for the combine and the end-to-end check
    action: str  # transform, deploy, deploy (derived from block_0), combine, end-to-end check
    done: int  # steps finished so far (this one included once it ended)
    total: int
    finished: bool  # False: the step starts; True: it ended, after ``seconds``
    seconds: float = 0.0
    ok: bool = True


ProgressFn = Callable[[StepEvent], None]


class StepCounter:
    """Counts finished steps for the threads of one compile and hands each start and end to ``report``."""

    def __init__(self, report: ProgressFn | None, total: int):
        self.report = report
        self.total = total
        self.done = 0
        self._lock = threading.Lock()

    def start(self, segment: str, action: str) -> None:
        if self.report:
            with self._lock:
                self.report(StepEvent(segment, action, self.done, self.total, finished=False))

    def finish(self, segment: str, action: str, seconds: float, ok: bool = True) -> None:
        with self._lock:
            self.done = min(self.done + 1, self.total)
            if self.report:
                self.report(StepEvent(segment, action, self.done, self.total, True, seconds, ok))
