"""A request's emit function when the request has tools: content streams on, tool calls are held and parsed.

Wraps the emitter of workers/conversation.py for any engine.  Text before a tool call's start streams as
token events at once; from the start on (a marker such as ``<tool_call>``, or output that opens with ``{``;
everything when ``tool_choice`` forces a call) it is held until generation ends.  Then the held text is
parsed (workers/protocol/tool_calls.py): calls go into the done message (``tool_calls``, finish reason
``tool_calls``) and their text is never sent as tokens; anything else is sent on as content, so what a
client reads is never lost and exactly one done ends the request either way.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from .protocol import FINISH_CANCELLED
from .protocol.messages import Generate
from .protocol.tool_calls import CallStart, is_forced, parse_tool_calls


def with_tool_calls(emit: Any, request: Generate, activity: dict[str, Any]) -> Any:
    """``emit`` itself when the request has no tools to parse (or tool_choice none), else it wrapped.
    ``activity``: what heartbeats report (held tokens count as progress: a worker holding a call is not stuck)."""
    params = request.params
    if not params.tools or params.tool_choice == "none":
        return emit
    return ToolCallEmitter(emit, request, activity)


class ToolCallEmitter:
    def __init__(self, emit: Any, request: Generate, activity: dict[str, Any]) -> None:
        params = request.params
        self._emit, self._activity = emit, activity
        self._start = CallStart(whole=is_forced(params.tool_choice))
        self._names = [tool["function"]["name"] for tool in params.tools or ()]
        self._parallel = params.parallel_tool_calls
        self._held_tokens = 0  # tokens of text not sent yet
        # logprobs asked: the emit takes each piece's entries, held with their text (conversation.py)
        self._logprobs = params.logprobs
        self._held_entries: list[Any] = []
        self.first_token_at: float | None = None

    def __call__(self, text: str, tokens: int = 1, entries: Any = ()) -> None:
        now = time.monotonic()
        self.first_token_at = self.first_token_at or now
        out = self._start.feed(text)
        if out:
            self._release(out, tokens, entries)
        else:
            self._held_tokens += tokens
            self._held_entries += entries
            self._activity["tokens"] += tokens
            self._activity["last_token_at"] = now

    def _release(self, text: str, tokens: int, entries: Any = ()) -> None:
        """Send ``text`` with the tokens held so far (which the activity already counts) and ``tokens``
        (and their logprobs entries, when the request asked)."""
        self._activity["tokens"] -= self._held_tokens
        if self._logprobs:
            self._emit(text, self._held_tokens + tokens, [*self._held_entries, *entries])
        else:
            self._emit(text, self._held_tokens + tokens)
        self._held_tokens, self._held_entries = 0, []

    def finish(self, finish_reason: str) -> tuple[dict[str, Any], ...] | None:
        """The calls of a generation that ended (their ids new), or None after sending the held text on."""
        held = self._start.held()
        calls = None if finish_reason == FINISH_CANCELLED else parse_tool_calls(held, self._names)
        if calls is None:
            if held:
                self._release(held, 0)
            return None
        if not self._parallel:
            calls = calls[:1]
        return tuple({"id": "call_" + secrets.token_hex(12), "type": "function", "function": call} for call in calls)
