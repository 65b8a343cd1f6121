"""Turning a token stream into client text: UTF-8 reassembly and stop strings.

Engine-neutral and pure, so every engine streams text the same way.
"""

from __future__ import annotations

import codecs


class TextAssembler:
    """Feeds raw token bytes in, gives text out, honouring stop strings.

    A token may end in the middle of a multi-byte UTF-8 character, and a stop
    string may span several tokens, so text is held back until it can no
    longer become part of either.
    """

    def __init__(self, stop: list[str] | tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stop if s]
        self._pending = ""  # decoded text that could still begin a stop string
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        if not self._stops:
            text, self._pending = self._pending, ""
            return text
        cut = _earliest_stop(self._pending, self._stops)
        if cut is not None:
            self.stopped = True
            text, self._pending = self._pending[:cut], ""
            return text
        keep = _longest_stop_prefix_suffix(self._pending, self._stops)
        split = len(self._pending) - keep
        text, self._pending = self._pending[:split], self._pending[split:]
        return text

    def flush(self) -> str:
        """The text still held back when generation ends without a stop string."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return text


def _earliest_stop(text: str, stops: list[str]) -> int | None:
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(positions) if positions else None


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best
