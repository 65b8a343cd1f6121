"""Tool calls in generated text: where they begin, what they say, and the schema that forces one.  No I/O.

Pure functions and one small state machine, standard library only, so both sides can use them: the worker
parses what its engine generated (it knows when generation ends, and every client, ZeroMQ or HTTP, then gets
the same ``tool_calls``), and the daemon could parse text from elsewhere with the same rules.  It lives in
the wire protocol's package because that is the one layer both import (docs/ARCHITECTURE.md).

The formats read (what common chat templates teach their models to write):

* Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call;
* Llama 3.x: ``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>``, several joined by ``;``;
* Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``;
* plain JSON ``{"name": ..., "arguments": {...}}`` (or a list of them): what the grammar of ``tool_choice``
  ``required`` or a named function produces, and what the fallback prompt (workers/tool_prompt.py) asks for.

Under ``auto`` an answer that opens with ``{`` or ``[`` is held until generation ends (it may be a call in
one of the marker-less forms), then sent as content if it is not one: such answers stream late, not lost.

A call counts only when its name is one of the request's tools and its arguments are a JSON object (or a
string holding one): anything else (malformed JSON, an unknown name, text after the calls) is not a call, and
the text stays the answer's content.  Nothing here raises on model output.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

TOOL_CHOICES = ("auto", "none", "required")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
MISTRAL_START = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
MARKERS = (HERMES_START, MISTRAL_START, PYTHON_TAG)
_CALL_KEYS = frozenset({"name", "arguments", "parameters", "type", "id"})
_DECODER = json.JSONDecoder()


def forced_name(tool_choice: Any) -> str | None:
    """The function a tool_choice names ({"type": "function", "function": {"name": ...}}), else None."""
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    return None


def is_forced(tool_choice: Any) -> bool:
    """Whether the output must be a call (``required`` or a named function): a grammar then enforces it."""
    return tool_choice == "required" or forced_name(tool_choice) is not None


def call_schema(tools: Iterable[dict[str, Any]], tool_choice: Any) -> dict[str, Any]:
    """The JSON schema of one call to one of ``tools`` (only the named one when ``tool_choice`` names one):
    ``{"name": NAME, "arguments": PARAMETERS}``, both required; anyOf over the tools."""
    only = forced_name(tool_choice)
    variants = []
    for tool in tools:
        function = tool["function"]
        if only is not None and function["name"] != only:
            continue
        variants.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": function["name"]},
                    "arguments": function.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


class CallStart:
    """Finds where tool calls begin in a stream of generated text.

    ``feed`` returns the text that is certainly content (it can be sent on at once); from a call's start on,
    everything is held, as is a tail that may be the beginning of a marker (``<tool_``) until the next text
    tells.  Output whose first non-blank character is ``{`` or ``[`` is held whole (Llama 3.x and plain
    JSON calls have no marker; a list is several calls).  ``whole``: hold everything from the start (a forced call: the output is JSON).
    """

    def __init__(self, whole: bool = False) -> None:
        self.holding = whole
        self._at_start = True
        self._pending = ""

    def feed(self, text: str) -> str:
        self._pending += text
        if self.holding:
            return ""
        pending = self._pending
        if self._at_start:
            stripped = pending.lstrip()
            if not stripped:
                return ""
            self._at_start = False
            if stripped[0] in "{[":
                self.holding = True
                return ""
        starts = [i for i in (pending.find(m) for m in MARKERS) if i >= 0]
        if starts:
            cut = min(starts)
            self.holding, self._pending = True, pending[cut:]
            return pending[:cut]
        keep = _marker_prefix_length(pending)
        self._pending = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def held(self) -> str:
        """What was held back: the calls' text (or the tail that turned out to be content)."""
        return self._pending


def _marker_prefix_length(text: str) -> int:
    """How long the end of ``text`` is that could begin a marker."""
    for length in range(min(len(text), max(map(len, MARKERS)) - 1), 0, -1):
        tail = text[-length:]
        if any(marker.startswith(tail) for marker in MARKERS):
            return length
    return 0


def parse_tool_calls(text: str, names: Iterable[str]) -> list[dict[str, Any]] | None:
    """The calls ``text`` holds, each ``{"name": str, "arguments": dict}``, when all of it is calls to the
    named functions in one of the formats above; else None (the text is content)."""
    known = set(names)
    body = text.strip()
    try:
        if body.startswith(HERMES_START):
            calls = _hermes(body)
        elif body.startswith(MISTRAL_START):
            calls = _json_values(body[len(MISTRAL_START) :])
        else:
            calls = _json_values(body.removeprefix(PYTHON_TAG))
    except (ValueError, RecursionError):
        return None
    if not calls:
        return None
    out = [_call(value, known) for value in calls]
    return None if any(call is None for call in out) else out  # type: ignore[return-value]


def _hermes(body: str) -> list[Any]:
    values, position = [], 0
    while position < len(body):
        if not body.startswith(HERMES_START, position):
            raise ValueError("text outside <tool_call> blocks")
        end = body.find(HERMES_END, position)
        inner = body[position + len(HERMES_START) : end if end >= 0 else len(body)]
        values.append(json.loads(inner))
        position = len(body) if end < 0 else end + len(HERMES_END)
        while position < len(body) and body[position].isspace():
            position += 1
    return values


def _json_values(text: str) -> list[Any]:
    """JSON values one after the other (separated by blanks, ``;`` or ``,``), a list counting as its items."""
    values, position, text = [], 0, text.strip()
    while position < len(text):
        value, position = _DECODER.raw_decode(text, position)
        values.extend(value if isinstance(value, list) else [value])
        while position < len(text) and (text[position].isspace() or text[position] in ";,"):
            position += 1
    return values


def _call(value: Any, known: set[str]) -> dict[str, Any] | None:
    if not isinstance(value, dict) or not set(value) <= _CALL_KEYS:
        return None
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(name, str) or name not in known or not isinstance(arguments, dict):
        return None
    return {"name": name, "arguments": arguments}
