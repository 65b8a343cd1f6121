"""Validation of a generate op's tools, tool_choice and tool messages: each problem an ``invalid_request``
naming the field (``tools[0].function.name``).  Pure functions, no I/O.

The parameters of a function are checked as a JSON schema as far as that goes without a schema
library in the daemon: an object, whose keywords that hold schemas (``properties``, ``items``, ``anyOf``,
...) hold schemas, whose ``type`` names JSON types and whose ``required`` lists names.  Whether the engine
can follow it as a grammar (``tool_choice`` required or named) only the engine knows: it converts it, or
refuses the request naming ``tools``.
"""

from __future__ import annotations

from typing import Any

from workers.protocol import ErrorCode, field_label
from workers.protocol.messages import MAX_TOOLS
from workers.protocol.tool_calls import TOOL_CHOICES, TOOL_NAME

from .errors import InvalidMessage

MAX_SCHEMA_DEPTH = 32
JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_FUNCTION_FIELDS = frozenset({"name", "description", "parameters", "strict"})
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> schema
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONES = ("items", "additionalProperties", "not", "contains", "if", "then", "else")
_CALL_FIELDS = frozenset({"id", "type", "function"})


def parse_tools(value: Any) -> tuple[dict[str, Any], ...] | None:
    """OpenAI's function tools, each as ``{"type": "function", "function": {name, description?, parameters?,
    strict?}}``; absent, null or empty: none."""
    if value is None or value == []:
        return None
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise _invalid("tools", f"must be a list of at most {MAX_TOOLS} function tools")
    seen: set[str] = set()
    for i, tool in enumerate(value):
        key = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _invalid(f"{key}.type", 'must be "function" (the only kind of tool)')
        if unknown := sorted(set(tool) - {"type", "function"}):
            raise _invalid(f"{key}.{field_label(unknown[0])}", "unknown field")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _invalid(f"{key}.function", "must be an object with a name")
        if unknown := sorted(set(function) - _FUNCTION_FIELDS):
            raise _invalid(f"{key}.function.{field_label(unknown[0])}", "unknown field")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise _invalid(f"{key}.function.name", "must be 1 to 64 letters, digits, _ or -")
        if name in seen:
            raise _invalid(f"{key}.function.name", f"{name!r} is named twice")
        seen.add(name)
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise _invalid(f"{key}.function.description", "must be a string")
        if function.get("strict") is not None and not isinstance(function["strict"], bool):
            raise _invalid(f"{key}.function.strict", "must be true or false")
        if "parameters" in function and function["parameters"] is not None:
            parameters = function["parameters"]
            if not isinstance(parameters, dict):
                raise _invalid(f"{key}.function.parameters", "must be a JSON schema object")
            if parameters.get("type", "object") != "object":
                raise _invalid(f"{key}.function.parameters.type", 'must be "object" (arguments are an object)')
            _check_schema(parameters, f"{key}.function.parameters", 0)
    return tuple(value)


def _check_schema(schema: Any, key: str, depth: int) -> None:
    if isinstance(schema, bool):
        return  # true / false: anything / nothing
    if not isinstance(schema, dict):
        raise _invalid(key, "must be a JSON schema (an object)")
    if depth > MAX_SCHEMA_DEPTH:
        raise _invalid(key, f"nested more than {MAX_SCHEMA_DEPTH} levels deep")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if not all(isinstance(k, str) and k in JSON_TYPES for k in kinds):
        raise _invalid(f"{key}.type", f"must be one of {', '.join(sorted(JSON_TYPES))} (or a list of them)")
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise _invalid(f"{key}.required", "must be a list of property names")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise _invalid(f"{key}.enum", "must be a list")
    for word in _SCHEMA_MAPS:
        if word in schema:
            if not isinstance(schema[word], dict):
                raise _invalid(f"{key}.{word}", "must be an object of schemas")
            for name, inner in schema[word].items():
                _check_schema(inner, f"{key}.{word}.{field_label(name)}", depth + 1)
    for word in _SCHEMA_LISTS:
        if word in schema:
            if not isinstance(schema[word], list):
                raise _invalid(f"{key}.{word}", "must be a list of schemas")
            for i, inner in enumerate(schema[word]):
                _check_schema(inner, f"{key}.{word}[{i}]", depth + 1)
    for word in _SCHEMA_ONES:
        if word in schema:
            _check_schema(schema[word], f"{key}.{word}", depth + 1)


def parse_tool_choice(value: Any, tools: tuple[dict[str, Any], ...] | None) -> Any:
    """auto, none, required or {"type": "function", "function": {"name": one of the tools}}; null: auto."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise _invalid("tool_choice", 'must be "auto", "none", "required" or a named function')
        if value == "required" and not tools:
            raise _invalid("tool_choice", "required needs tools to choose from")
        return value
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or set(value) != {"type", "function"}:
        raise _invalid("tool_choice", 'must be "auto", "none", "required" or {"type": "function", "function": ...}')
    if not isinstance(function, dict) or set(function) != {"name"} or not isinstance(function["name"], str):
        raise _invalid("tool_choice.function", "must be an object with exactly a name")
    names = {tool["function"]["name"] for tool in tools or ()}
    if function["name"] not in names:
        raise _invalid("tool_choice.function.name", f"{ascii(function['name'][:64])} is not one of the tools")
    return value


def check_tool_messages(i: int, item: dict[str, Any], has_tools: bool) -> None:
    """A role "tool" message ({role, content, tool_call_id}) or an assistant's with tool_calls: the calls'
    arguments are objects (the protocol's form; OpenAI's HTTP front decodes its JSON strings).  Either needs
    the request's tools (an engine that does tools renders them)."""
    key = f"messages[{i}]"
    if item["role"] == "tool":
        if set(item) != {"role", "content", "tool_call_id"} and set(item) != {"role", "content"}:
            raise _invalid(key, "a tool message has role, content and tool_call_id")
        if item.get("tool_call_id") is not None and not isinstance(item["tool_call_id"], str):
            raise _invalid(f"{key}.tool_call_id", "must be a string")
        if not isinstance(item["content"], str):
            raise _invalid(f"{key}.content", "must be a string")
    else:
        if set(item) != {"role", "content", "tool_calls"}:
            raise _invalid(key, "must be an object with exactly role and content (and tool_calls for an assistant)")
        if item["role"] != "assistant":
            raise _invalid(f"{key}.tool_calls", "only an assistant message has tool calls")
        if item["content"] is not None and not isinstance(item["content"], str):
            raise _invalid(f"{key}.content", "must be a string or null")
        _check_calls(item["tool_calls"], f"{key}.tool_calls")
    if not has_tools:
        raise _invalid(key, "tool messages and tool calls need the request's tools")


def _check_calls(calls: Any, key: str) -> None:
    if not isinstance(calls, list) or not calls:
        raise _invalid(key, "must be a non-empty list of calls")
    for j, call in enumerate(calls):
        where = f"{key}[{j}]"
        if not isinstance(call, dict) or not set(call) <= _CALL_FIELDS or call.get("type", "function") != "function":
            raise _invalid(where, 'must be an object with id, type "function" and function')
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise _invalid(f"{where}.id", "must be a string")
        function = call.get("function")
        if not isinstance(function, dict) or set(function) != {"name", "arguments"}:
            raise _invalid(f"{where}.function", "must be an object with exactly name and arguments")
        if not isinstance(function["name"], str) or not TOOL_NAME.match(function["name"]):
            raise _invalid(f"{where}.function.name", "must be 1 to 64 letters, digits, _ or -")
        if not isinstance(function["arguments"], dict):
            raise _invalid(f"{where}.function.arguments", "must be an object")


def _invalid(key: str, problem: str) -> InvalidMessage:
    return InvalidMessage(ErrorCode.INVALID_REQUEST, f"{key}: {problem}")
