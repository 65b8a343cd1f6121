"""Validation of client messages: every way a message can be wrong gets its own
error code and a message naming the field.  Pure functions, no I/O.

The daemon's op table calls ``message_op`` and ``message_id`` for every
message, then the op's own check: ``parse_generate``, ``parse_cancel`` or
``check_bare`` (ping, status).  Each op check refuses text that is not Unicode
and unknown fields first, so nothing the client sent reaches a worker or a
reply unchecked.  Error messages echo client input only as field labels or
``ascii()`` forms, so every error stays encodable and one line.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from workers.protocol import CLIENT_OPS, OP_GENERATE, ErrorCode, field_label, invalid_text_path, is_text
from workers.protocol.messages import (
    CAP_EMBEDDINGS,
    DEFAULT_MAX_TOKENS,
    MAX_LOGIT_BIAS,
    SAMPLING_FIELDS,
    Sampling,
)
from workers.protocol.tool_calls import is_forced

from .errors import InvalidMessage
from .tool_validation import check_tool_messages, parse_tool_choice, parse_tools

MAX_ID_LENGTH = 128
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256
MAX_ECHO_LENGTH = 64
MAX_EMBED_INPUTS = 2048  # inputs of one embed op (OpenAI's limit)
MAX_TOKEN_ID = 2**31 - 1
# What the router asks of an engine for a generate op: that it generates (every engine but one in embedding
# mode, whose ready lists only "embeddings").  The daemon's own, never in a ready message.
CAP_GENERATE = "generate"
ROLES = ("system", "user", "assistant", "tool")
_NOT_TEXT = "not valid Unicode text (a lone UTF-16 surrogate)"


EmbedInput = tuple[str, ...] | tuple[tuple[int, ...], ...]


@dataclass
class GenerateParams:
    """A validated generate op, or an embed op (``input`` set; no prompt, messages or sampling)."""

    prompt: str | None
    messages: list[dict[str, Any]] | None
    stream: bool
    engine: str | None
    deadline_ms: int | None
    sampling: Sampling = field(default_factory=Sampling)  # what the worker receives as "params"
    keep_alive: float | None = None  # seconds the model stays loaded after it (-1: for ever); None: the engine's
    input: EmbedInput | None = None  # an embed op's strings, or token arrays

    def needs(self) -> dict[str, str]:
        """The capabilities an engine needs to serve it, each with the field that asks for it."""
        if self.input is not None:
            return {CAP_EMBEDDINGS: "input"}
        return {**self.sampling.needs(), CAP_GENERATE: "prompt" if self.messages is None else "messages"}


def message_op(message: dict[str, Any]) -> str:
    """The op, checked before anything else: an unknown op has a code of its own
    (``unknown_op``), since the client then speaks another protocol."""
    op = message.get("op")
    if op not in CLIENT_OPS:
        got = "missing" if "op" not in message else f"got {_echo(op)}"
        raise InvalidMessage(ErrorCode.UNKNOWN_OP, f"op: must be one of {', '.join(CLIENT_OPS)}; {got}")
    return op


def message_id(message: dict[str, Any]) -> str:
    """The client's id for this message (every op needs one).  Every event
    echoes it, so an id that UTF-8 cannot carry is refused here."""
    value = message.get("id")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise _invalid("id", f"must be a string of 1 to {MAX_ID_LENGTH} characters")
    if not is_text(value):
        raise _invalid("id", _NOT_TEXT)
    return value


def reply_id(message: dict[str, Any]) -> str | None:
    """The id for an error answering ``message``: the client's id when it is a
    readable string, else None (docs/PROTOCOL.md, Ids), so that the client can
    tie the error to its request and the reply stays encodable."""
    value = message.get("id")
    return value if isinstance(value, str) and is_text(value) else None


_GENERATE_FIELDS = frozenset(
    {"op", "id", "prompt", "messages", "stream", "engine", "deadline_ms", "keep_alive", *SAMPLING_FIELDS}
)
_EMBED_FIELDS = frozenset({"op", "id", "input", "engine", "deadline_ms", "keep_alive"})
_CANCEL_FIELDS = frozenset({"op", "id", "target"})
_LOAD_FIELDS = frozenset({"op", "id", "engine", "keep_alive"})
_UNLOAD_FIELDS = frozenset({"op", "id", "engine", "all"})
_BARE_FIELDS = frozenset({"op", "id"})


def parse_generate(message: dict[str, Any], max_tokens_limit: int) -> GenerateParams:
    """Validate a generate op into what the scheduler and the worker need.
    Whatever passes here is sent to a worker process, where a bad value would
    cost a failed request or a restart instead of a clear error."""
    _check_fields(message, _GENERATE_FIELDS)
    prompt, messages = _prompt_or_messages(message)
    sampling = parse_sampling(message, max_tokens_limit)
    if prompt is not None and sampling.tools:
        raise _invalid("tools", "need messages: a chat template renders them (a prompt has none)")
    return GenerateParams(
        prompt=prompt,
        messages=messages,
        stream=_bool(message, "stream", True),
        engine=_optional_str(message, "engine"),
        deadline_ms=_int(message, "deadline_ms", None, 1, 24 * 3600 * 1000, nullable=True),
        keep_alive=parse_keep_alive(message.get("keep_alive")),
        sampling=sampling,
    )


def parse_embed(message: dict[str, Any]) -> GenerateParams:
    """Validate an embed op: ``input`` a non-empty string, a list of them, or a list of token arrays."""
    _check_fields(message, _EMBED_FIELDS)
    return GenerateParams(
        prompt=None,
        messages=None,
        stream=False,
        engine=_optional_str(message, "engine"),
        deadline_ms=_int(message, "deadline_ms", None, 1, 24 * 3600 * 1000, nullable=True),
        keep_alive=parse_keep_alive(message.get("keep_alive")),
        input=_embed_input(message),
    )


def _embed_input(message: dict[str, Any]) -> EmbedInput:
    """A string, a list of 1 to MAX_EMBED_INPUTS strings, or as many token arrays (lists of token ids), none empty."""
    if "input" not in message:
        raise _invalid("input", "missing: give a string, a list of strings or a list of token arrays")
    value = message["input"]
    if isinstance(value, str):
        if not value:
            raise _invalid("input", "must not be empty")
        return (value,)
    if not isinstance(value, list) or not value:
        raise _invalid("input", "must be a non-empty string, or a non-empty list of strings or of token arrays")
    if len(value) > MAX_EMBED_INPUTS:
        raise _invalid("input", f"at most {MAX_EMBED_INPUTS} inputs; got {len(value)}")
    strings = isinstance(value[0], str)
    for i, item in enumerate(value):
        if strings:
            if not isinstance(item, str):
                raise _invalid(f"input[{i}]", "must be a string, as input[0] is (strings and token arrays do not mix)")
            if not item:
                raise _invalid(f"input[{i}]", "must not be empty")
            continue
        if not isinstance(item, list) or not item:
            raise _invalid(f"input[{i}]", "must be a non-empty string or a non-empty array of token ids")
        for j, token in enumerate(item):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= MAX_TOKEN_ID:
                raise _invalid(f"input[{i}][{j}]", "must be a token id (a non-negative integer)")
    if strings:
        return tuple(value)
    return tuple(tuple(item) for item in value)


# Each sampling field with its type and limits, read once: a generate op is checked against this table.
_SAMPLING = [
    (f, typing.get_type_hints(Sampling)[f.name], f.metadata.get("limits", (None, None)))
    for f in dataclasses.fields(Sampling)
]
_INT_OR_NONE, _FLOAT_OR_NONE, _STR_OR_NONE, _TOKEN_MAP = int | None, float | None, str | None, dict[str, float]


def parse_sampling(message: dict[str, Any], max_tokens_limit: int) -> Sampling:
    """The sampling settings of a generate op, each field checked by its type and limits as
    ``Sampling`` defines them; what the client leaves out keeps the default (``max_tokens``
    never above ``max_tokens_limit``)."""
    # What the client leaves out keeps Sampling's default: only the fields it gave are checked.
    values: dict[str, Any] = {"max_tokens": min(DEFAULT_MAX_TOKENS, max_tokens_limit)}
    for f, hint, (low, high) in _SAMPLING:
        if f.name not in message:
            continue
        default = f.default
        if f.name == "max_tokens":
            default, high = min(default, max_tokens_limit), max_tokens_limit
        if f.name == "stop":
            values["stop"] = tuple(_stop(message))
        elif f.name == "response_format":
            values[f.name] = _response_format(message)
        elif f.name == "tools":
            values[f.name] = parse_tools(message["tools"])
        elif f.name == "tool_choice":
            values[f.name] = parse_tool_choice(message["tool_choice"], parse_tools(message.get("tools")))
        elif hint is bool:
            values[f.name] = _bool(message, f.name, default)
        elif hint in (int, _INT_OR_NONE):
            values[f.name] = _int(message, f.name, default, low, high, nullable=hint is not int)
        elif hint in (float, _FLOAT_OR_NONE):
            values[f.name] = _number(message, f.name, default, low, high)
        elif hint == _TOKEN_MAP:
            values[f.name] = _token_map(message, f.name, low, high)
        elif hint == _STR_OR_NONE:
            values[f.name] = _text(message, f.name, low, high)
        else:  # a new kind of field needs its check written here first
            raise TypeError(f"Sampling.{f.name}: no check for {hint}")
    if values.get("grammar") is not None and values.get("response_format") is not None:
        raise _invalid("grammar", "give at most one of grammar and response_format")
    if is_forced(values.get("tool_choice")) and (values.get("grammar") or values.get("response_format")):
        raise _invalid("tool_choice", "a forced call has a grammar of its own: give no grammar or response_format")
    if values.get("top_logprobs") and not values.get("logprobs"):  # OpenAI's rule
        raise _invalid("top_logprobs", "needs logprobs set to true")
    return Sampling(**values)


_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_KEEP_ALIVE_S = 366 * 24 * 3600.0


def parse_keep_alive(value: Any, key: str = "keep_alive") -> float | None:
    """Ollama's keep_alive: seconds as a number, or a duration string ("300", "5m", "1h", "0");
    negative: for ever (-1); absent or null: the engine's own."""
    if value is None:
        return None
    if isinstance(value, str) and (match := _DURATION.match(value.strip())):
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise _invalid(key, 'must be a number of seconds or a duration such as "5m" (negative: for ever)')
    if seconds != seconds or seconds > MAX_KEEP_ALIVE_S:
        raise _invalid(key, f"must be at most {MAX_KEEP_ALIVE_S:.0f} seconds (negative: for ever)")
    return -1.0 if seconds < 0 else seconds


def parse_cancel(message: dict[str, Any]) -> str:
    """Validate a cancel op; return its target, the id of a generate request."""
    _check_fields(message, _CANCEL_FIELDS)
    target = message.get("target")
    if not isinstance(target, str) or not target:
        raise _invalid("target", "must be the id of a generate request")
    return target


def parse_load(message: dict[str, Any]) -> tuple[str, float | None]:
    """Validate a load op: the engine's name and the keep_alive it then has (None: its own)."""
    _check_fields(message, _LOAD_FIELDS)
    engine = message.get("engine")
    if not isinstance(engine, str) or not engine:
        raise _invalid("engine", "must be the name of an engine")
    return engine, parse_keep_alive(message.get("keep_alive"))


def parse_unload(message: dict[str, Any]) -> str | None:
    """Validate an unload op: the engine's name, or None with ``all: true``."""
    _check_fields(message, _UNLOAD_FIELDS)
    engine, every = message.get("engine"), _bool(message, "all", False)
    if every == (engine is not None):
        raise _invalid("engine", "give the name of an engine, or all: true")
    if not every and (not isinstance(engine, str) or not engine):
        raise _invalid("engine", "must be the name of an engine")
    return None if every else engine


def check_bare(message: dict[str, Any]) -> None:
    """Validate an op that takes nothing but ``op`` and ``id`` (ping, status):
    refusing anything more keeps the promise that a misspelt field never
    passes silently."""
    _check_fields(message, _BARE_FIELDS)


def _check_fields(message: dict[str, Any], allowed: frozenset[str]) -> None:
    """Refuse text that is not Unicode anywhere (first, so that a bad field name
    is reported as such), then fields the op does not know."""
    path = invalid_text_path(message)
    if path is not None:
        raise _invalid(path or "message", _NOT_TEXT)
    unknown = sorted(set(message) - allowed)
    if unknown:
        raise _invalid(field_label(unknown[0]), "unknown field")


def _prompt_or_messages(message: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]] | None]:
    """Exactly one of prompt and messages, present and not null."""
    if ("prompt" in message) == ("messages" in message):
        raise _invalid("prompt", "give exactly one of prompt and messages")
    if "prompt" in message:
        if not isinstance(message["prompt"], str):
            raise _invalid("prompt", "must be a string")
        return message["prompt"], None
    _check_messages(message["messages"], bool(message.get("tools")))
    return None, message["messages"]


def _check_messages(messages: Any, has_tools: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty list of {role, content} objects")
    for i, item in enumerate(messages):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise _invalid(f"messages[{i}]", "must be an object with exactly role and content")
        if item["role"] not in ROLES:
            raise _invalid(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        if item["role"] == "tool" or "tool_calls" in item:
            check_tool_messages(i, item, has_tools)
            continue
        if set(item) != {"role", "content"}:
            raise _invalid(f"messages[{i}]", "must be an object with exactly role and content")
        if not isinstance(item["content"], str):
            raise _invalid(f"messages[{i}].content", "must be a string")


def _stop(message: dict[str, Any]) -> list[str]:
    """A string or a list of strings; absent means none, null is refused."""
    if "stop" not in message:
        return []
    value = message["stop"]
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list):
        raise _invalid("stop", f"must be a string or a list of strings of 1 to {MAX_STOP_LENGTH} characters")
    if len(stops) > MAX_STOP_STRINGS:
        raise _invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for i, stop in enumerate(stops):
        if not isinstance(stop, str) or not 0 < len(stop) <= MAX_STOP_LENGTH:
            key = "stop" if isinstance(value, str) else f"stop[{i}]"
            raise _invalid(key, f"must be a string of 1 to {MAX_STOP_LENGTH} characters")
    return stops


_JSON_SCHEMA_FIELDS = frozenset({"name", "description", "schema", "strict"})


def _response_format(message: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's response_format: text (None: nothing to constrain), json_object, or json_schema whose schema
    is a JSON object (whether the engine can follow it only the engine knows: it converts it, or refuses it)."""
    value = message.get("response_format")
    if value is None:
        return None
    key = "response_format"
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise _invalid(key, "must be an object whose type is text, json_object or json_schema")
    kind = value["type"]
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    if unknown := sorted(set(value) - allowed):
        raise _invalid(f"{key}.{field_label(unknown[0])}", f"unknown field for type {kind}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": kind}
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _invalid(f"{key}.json_schema", "must be an object with a schema")
    if unknown := sorted(set(spec) - _JSON_SCHEMA_FIELDS):
        raise _invalid(f"{key}.json_schema.{field_label(unknown[0])}", "unknown field")
    if not isinstance(spec.get("schema"), dict):
        raise _invalid(f"{key}.json_schema.schema", "must be a JSON schema (an object)")
    for name, kind_ok, words in (
        ("name", str, "a string"),
        ("description", str, "a string"),
        ("strict", bool, "true or false"),
    ):
        if spec.get(name) is not None and not isinstance(spec[name], kind_ok):
            raise _invalid(f"{key}.json_schema.{name}", f"must be {words}")
    return {"type": "json_schema", "json_schema": spec}


def _text(message: dict[str, Any], key: str, low: int, high: int) -> str | None:
    """A string of low..high characters, or null."""
    value = message.get(key)
    if value is not None and (not isinstance(value, str) or not low <= len(value) <= high):
        raise _invalid(key, f"must be a string of {low} to {high} characters, or null")
    return value


def _token_map(message: dict[str, Any], key: str, low: float, high: float) -> dict[str, float]:
    """An object of token ids (decimal strings, as JSON keys are) to numbers in [low, high]; absent or null: empty.
    Whether an id is in the model's vocabulary only the engine knows (it refuses one that is not)."""
    value = message.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(key, "must be an object of token ids to numbers")
    if len(value) > MAX_LOGIT_BIAS:
        raise _invalid(key, f"at most {MAX_LOGIT_BIAS} tokens")
    out: dict[str, float] = {}
    for token, bias in value.items():
        if not (isinstance(token, str) and token.isascii() and token.isdigit() and len(token) <= 10):
            raise _invalid(key, f"key {_echo(token)} is not a token id (a non-negative integer)")
        out[str(int(token))] = _number(value, token, 0.0, low, high, label=f"{key}[{token}]")
    return out


def _int(
    message: dict[str, Any], key: str, default: int | None, low: int, high: int, *, nullable: bool = False
) -> int | None:
    """An integer in [low, high]; null only where the protocol allows it."""
    value = message.get(key, default)
    if value is None and nullable:
        return None
    # JSON true/false arrive as bool, which Python counts as int: refuse them.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(key, "must be an integer" + (" or null" if nullable else ""))
    if not low <= value <= high:
        raise _invalid(key, f"must be between {low} and {high}")
    return value


def _number(
    message: dict[str, Any], key: str, default: float, low: float, high: float, label: str | None = None
) -> float:
    """A number in [low, high] (NaN is in no range)."""
    value = message.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(label or key, "must be a number")
    if not low <= value <= high:
        raise _invalid(label or key, f"must be between {low} and {high}")
    return float(value)


def _bool(message: dict[str, Any], key: str, default: bool) -> bool:
    value = message.get(key, default)
    if not isinstance(value, bool):
        raise _invalid(key, "must be true or false")
    return value


def _optional_str(message: dict[str, Any], key: str) -> str | None:
    value = message.get(key)
    if value is not None and not isinstance(value, str):
        raise _invalid(key, "must be a string or null")
    return value


def _echo(value: Any) -> str:
    """Client input as an error message may show it: a string ascii-quoted and
    cut short, anything else by its JSON type (never its possibly huge or
    deeply nested value)."""
    if isinstance(value, str):
        cut = value[:MAX_ECHO_LENGTH]
        return ascii(cut) + ("..." if len(cut) < len(value) else "")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number" if isinstance(value, (int, float)) else "an array" if isinstance(value, list) else "an object"


def _invalid(key: str, problem: str) -> InvalidMessage:
    return InvalidMessage(ErrorCode.INVALID_REQUEST, f"{key}: {problem}")


__all__ = [
    "GenerateParams",
    "InvalidMessage",
    "OP_GENERATE",
    "check_bare",
    "message_id",
    "message_op",
    "parse_cancel",
    "parse_embed",
    "parse_generate",
    "parse_keep_alive",
    "parse_load",
    "parse_sampling",
    "parse_unload",
    "reply_id",
]
