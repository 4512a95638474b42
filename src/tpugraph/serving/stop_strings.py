"""Generated text -> the part a client may see: cut where a stop string appears, held back while it may begin one."""

from __future__ import annotations


class StopStrings:
    """Feed the text as it comes; each ``feed`` returns what is safe to show. Text that could be the start of a
    stop string waits until the next pieces settle it, so a stop string never reaches the client, even streamed."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything fed so far, cut at the stop string once one appeared
        self.shown = 0  # of which this many characters were returned
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._show(len(self.text))
        return self._show(len(self.text) - self._held())

    def flush(self) -> str:
        """The end of the text held back for a stop string that never came."""
        return self._show(len(self.text))

    def _held(self) -> int:
        """Length of the text's longest end that is a proper beginning of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _show(self, upto: int) -> str:
        upto = max(upto, self.shown)
        piece, self.shown = self.text[self.shown: upto], upto
        return piece
