"""Turning a token stream into client text: UTF-8 reassembly and stop strings.

Engine-neutral and pure, so every engine streams text the same way.
"""

from __future__ import annotations

import codecs
from collections import deque


class TextAssembler:
    """Feeds raw token bytes in, gives text out, honouring stop strings.

    A token may end in the middle of a multi-byte UTF-8 character, and a stop
    string may span several tokens, so text is held back until it can no
    longer become part of either.

    Because of that holding back, one piece of text may carry several tokens
    (or only the rest of a token already counted); :meth:`take_tokens` says
    how many tokens the text returned since its last call holds.  A token
    counts with the piece that carries the first character of its text (a
    token holding only part of a character counts with the piece carrying
    that character); tokens of a stop string, which is never returned, are
    never counted.
    """

    def __init__(self, stop: list[str] | tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stop if s]
        self._pending = ""  # decoded text that could still begin a stop string
        self.stopped = False
        self._decoded = 0  # characters decoded so far
        self._released = 0  # characters returned so far
        self._token_starts: deque[int] = deque()  # where each uncounted token's text begins

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._token_starts.append(self._decoded)
        self._pending += self._decode(piece)
        if not self._stops:
            return self._release(len(self._pending))
        cut = _earliest_stop(self._pending, self._stops)
        if cut is not None:
            self.stopped = True
            return self._release(cut, drop_rest=True)
        keep = _longest_stop_prefix_suffix(self._pending, self._stops)
        return self._release(len(self._pending) - keep)

    def flush(self) -> str:
        """The text still held back when generation ends without a stop string."""
        if self.stopped:
            return ""
        self._pending += self._decode(b"", final=True)
        return self._release(len(self._pending))

    def take_tokens(self) -> int:
        """How many tokens the text returned since the last call holds (see the class)."""
        starts, released = self._token_starts, self._released
        count = 0
        while starts and starts[0] < released:
            starts.popleft()
            count += 1
        return count

    def _decode(self, piece: bytes, final: bool = False) -> str:
        text = self._decoder.decode(piece, final)
        self._decoded += len(text)
        return text

    def _release(self, length: int, drop_rest: bool = False) -> str:
        """Return the first ``length`` pending characters; keep the rest unless ``drop_rest``."""
        text = self._pending[:length]
        self._pending = "" if drop_rest else self._pending[length:]
        self._released += len(text)
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
