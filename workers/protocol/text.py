"""Text checks of the wire protocol: which strings are Unicode text, and where
the first one that is not sits in a message (standard library only)."""

from __future__ import annotations

import re
from typing import Any, Iterator

_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_LABEL_LENGTH = 64


def is_text(value: str) -> bool:
    """Whether a str is Unicode text that UTF-8 can encode.  ``json.loads``
    turns an unpaired ``\\ud800``..``\\udfff`` escape into a lone surrogate,
    which is not; a paired escape becomes one proper character."""
    return value.isascii() or _SURROGATE.search(value) is None


def field_label(name: str) -> str:
    """A field name as a JSON path or an error message shows it: itself when it
    is an identifier, else ASCII-quoted and cut to MAX_LABEL_LENGTH characters,
    so that the label is always one short line of encodable text."""
    if name.isidentifier() and is_text(name) and len(name) <= MAX_LABEL_LENGTH:
        return name
    cut = name[:MAX_LABEL_LENGTH]
    return ascii(cut) + ("..." if len(cut) < len(name) else "")


def invalid_text_path(value: Any) -> str | None:
    """The path (``prompt``, ``messages[0].content``, ``stop[1]``) of the first
    string, key or value at any depth, that is not Unicode text; None when all
    are.  ``""`` when ``value`` itself is such a string.

    Such text cannot be written as UTF-8 and fails wherever it is used next (a
    reply, a worker's tokenizer), so readers check it once at the door and
    name the culprit.  A bad key is named by its own (escaped) label.  A stack
    of iterators, not recursion, so depth is bounded only by the decoder; the
    path is built only for the culprit, so a long list costs little.
    """
    if isinstance(value, str):
        return None if is_text(value) else ""
    # One frame per open container: the step that led into it, and its children.
    frames: list[tuple[Any, Iterator[tuple[Any, Any]]]] = [(None, _steps(value))]
    while frames:
        for step, child in frames[-1][1]:
            if isinstance(child, str):
                if not is_text(child):
                    return _path([*(f[0] for f in frames[1:]), step])
            elif isinstance(child, (dict, list, tuple)):
                frames.append((step, _steps(child)))
                break
        else:
            frames.pop()
    return None


def _steps(container: Any) -> Iterator[tuple[Any, Any]]:
    """(step, child) of a container in document order; a dict yields each key
    as a child under its own step first, so keys are checked as text too."""
    if isinstance(container, dict):
        return _dict_steps(container)
    if isinstance(container, (list, tuple)):
        return enumerate(container)
    return iter(())


def _dict_steps(mapping: dict[Any, Any]) -> Iterator[tuple[Any, Any]]:
    for key, child in mapping.items():
        yield key, key
        yield key, child


def _path(steps: list[Any]) -> str:
    """``messages[0].content`` from the steps ``["messages", 0, "content"]``."""
    parts: list[str] = []
    for step in steps:
        if isinstance(step, int) and not isinstance(step, bool):
            parts.append(f"[{step}]")
        else:
            label = field_label(step) if isinstance(step, str) else ascii(step)
            parts.append(f".{label}" if parts else label)
    return "".join(parts)
