"""Validation of client messages: every way a message can be wrong gets its own
error code and a message naming the field.  Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.protocol import CLIENT_OPS, OP_CANCEL, OP_GENERATE, ErrorCode

MAX_ID_LENGTH = 128
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256
ROLES = ("system", "user", "assistant")


class InvalidMessage(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class GenerateParams:
    """A validated generate op."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    stream: bool
    engine: str | None
    deadline_ms: int | None
    sampling: dict[str, Any] = field(default_factory=dict)  # what the worker receives as "params"


def message_id(message: dict[str, Any]) -> str:
    """The client's id for this message (every op needs one)."""
    value = message.get("id")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise InvalidMessage(ErrorCode.INVALID_REQUEST, f"id: must be a string of 1 to {MAX_ID_LENGTH} characters")
    return value


def message_op(message: dict[str, Any]) -> str:
    op = message.get("op")
    if op not in CLIENT_OPS:
        raise InvalidMessage(ErrorCode.UNKNOWN_OP, f"op: {op!r} is not one of {', '.join(CLIENT_OPS)}")
    return op


_GENERATE_FIELDS = {
    "op", "id", "prompt", "messages", "stream", "engine", "deadline_ms",
    "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "ignore_eos",
}  # fmt: skip


def parse_generate(message: dict[str, Any], max_tokens_limit: int) -> GenerateParams:
    unknown = sorted(set(message) - _GENERATE_FIELDS)
    if unknown:
        raise _invalid(unknown[0], "unknown field")
    prompt, messages = message.get("prompt"), message.get("messages")
    if (prompt is None) == (messages is None):
        raise _invalid("prompt", "give exactly one of prompt and messages")
    if prompt is not None and not isinstance(prompt, str):
        raise _invalid("prompt", "must be a string")
    if messages is not None:
        _check_messages(messages)
    sampling = {
        "max_tokens": _int(message, "max_tokens", 256, 1, max_tokens_limit),
        "temperature": _number(message, "temperature", 0.8, 0.0, 5.0),
        "top_p": _number(message, "top_p", 0.95, 0.0, 1.0),
        "top_k": _int(message, "top_k", 40, 0, 1_000_000),
        "stop": _stop(message.get("stop")),
        "seed": _int(message, "seed", None, 0, 2**32 - 1),
        "ignore_eos": _bool(message, "ignore_eos", False),
    }
    engine = message.get("engine")
    if engine is not None and not isinstance(engine, str):
        raise _invalid("engine", "must be a string")
    return GenerateParams(
        prompt=prompt,
        messages=messages,
        stream=_bool(message, "stream", True),
        engine=engine,
        deadline_ms=_int(message, "deadline_ms", None, 1, 24 * 3600 * 1000),
        sampling=sampling,
    )


def parse_cancel_target(message: dict[str, Any]) -> str:
    if message.get("op") != OP_CANCEL:
        raise AssertionError("not a cancel op")
    target = message.get("target")
    if not isinstance(target, str) or not target:
        raise _invalid("target", "must be the id of a generate request")
    return target


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty list of {role, content} objects")
    for i, item in enumerate(messages):
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            raise _invalid(f"messages[{i}]", "must be an object with exactly role and content")
        if item["role"] not in ROLES:
            raise _invalid(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        if not isinstance(item["content"], str):
            raise _invalid(f"messages[{i}].content", "must be a string")


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stops):
        raise _invalid("stop", f"must be a string or a list of strings of 1 to {MAX_STOP_LENGTH} characters")
    if len(stops) > MAX_STOP_STRINGS:
        raise _invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    return stops


def _int(message: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = message.get(key, default)
    if value is None:
        return None
    # JSON true/false arrive as bool, which Python counts as int: refuse them.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(key, "must be an integer")
    if not low <= value <= high:
        raise _invalid(key, f"must be between {low} and {high}")
    return value


def _number(message: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = message.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(key, "must be a number")
    if not low <= value <= high:
        raise _invalid(key, f"must be between {low} and {high}")
    return float(value)


def _bool(message: dict[str, Any], key: str, default: bool) -> bool:
    value = message.get(key, default)
    if not isinstance(value, bool):
        raise _invalid(key, "must be true or false")
    return value


def _invalid(key: str, problem: str) -> InvalidMessage:
    return InvalidMessage(ErrorCode.INVALID_REQUEST, f"{key}: {problem}")


__all__ = ["GenerateParams", "InvalidMessage", "message_id", "message_op", "parse_cancel_target", "parse_generate", "OP_GENERATE"]


def parse_cancel(message: dict[str, Any]) -> str:
    return parse_cancel_target(message)


def check_bare(message: dict[str, Any]) -> None:
    """ping and status carry op and id only."""
