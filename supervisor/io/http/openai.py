"""OpenAI's HTTP API in the protocol's terms: a request body becomes a generate
op, the daemon's error codes become OpenAI errors.  No I/O.

Everything the protocol can check (ranges, types, stop strings, Unicode) is
left to the protocol's own validation (core/validate.py), whose messages
name the field; this module only translates names and shapes, and refuses
what OpenAI's API has and the daemon does not do (``echo``, ``suffix``, ...)
with a 400 naming the parameter.  ``n`` > 1 becomes n generate ops pinned to
one engine that has the slots to run them together (:func:`engine_for_choices`).
Tools: ``tools``, ``tool_choice`` and ``parallel_tool_calls`` pass as they are;
a tool call's ``arguments``, a JSON string here, is an object in the protocol
(decoded from history, encoded in answers: answers.py).  docs/HTTP.md lists
every field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from workers import protocol as p
from workers.protocol import ErrorCode

from workers.protocol.messages import SAMPLING_FIELDS

from ...config import EngineConfig

CHAT = "chat"
COMPLETIONS = "completions"
DEFAULT_MODEL = "default"  # the `model` that lets the daemon choose (as an absent one does)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat uses the protocol's

# Passed to the generate op as they are (null: the protocol's default): every sampling field but max_tokens
# (taken apart: chat's max_completion_tokens, completions' default), deadline_ms and keep_alive.  top_k, ignore_eos,
# min_p, repeat_penalty, penalty_last_n (llama-server's names) and deadline_ms are extensions to OpenAI's API;
# keep_alive is Ollama's.
PASSED = (*(name for name in SAMPLING_FIELDS if name != "max_tokens"), "deadline_ms", "keep_alive")
# Known to OpenAI's API and refused unless null or one of these values (which change nothing).
REFUSED_UNLESS: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "suffix": (),
    "functions": ([],),  # the deprecated forms of tools and tool_choice
    "function_call": ("none",),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
}
TOOL_FIELDS = frozenset({"tools", "tool_choice", "parallel_tool_calls"})  # chat only: the template renders tools
COMMON = frozenset({"model", "max_tokens", "stream", "stream_options", "user", *PASSED}) - TOOL_FIELDS
FIELDS = {
    CHAT: COMMON
    | TOOL_FIELDS
    | {"messages", "max_completion_tokens", "n"}
    | (REFUSED_UNLESS.keys() - {"echo", "suffix"}),
    # completions' logprobs is the legacy integer (how many alternatives), not chat's pair of fields
    COMPLETIONS: (COMMON - {"top_logprobs"}) | {"prompt", "n", "best_of", "logprobs", "echo", "suffix"},
}
MAX_COMPLETIONS_LOGPROBS = 5  # the legacy API's limit on completions' logprobs
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_ROLE_FIELDS = {"tool": ("tool_call_id",), "assistant": ("tool_calls",)}  # beyond role and content

# The daemon's error codes as HTTP statuses, as OpenAI's API uses them.
STATUS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.MALFORMED: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNKNOWN_OP: 400,
    ErrorCode.DUPLICATE_ID: 400,
    ErrorCode.CONTEXT_OVERFLOW: 400,
    ErrorCode.UNSUPPORTED_PARAMETER: 400,
    ErrorCode.UNKNOWN_ENGINE: 404,
    ErrorCode.BUSY: 429,
    ErrorCode.NO_ENGINE: 503,
    ErrorCode.INSUFFICIENT_MEMORY: 503,
    ErrorCode.ENGINE_UNAVAILABLE: 503,
    ErrorCode.MODEL_NOT_FOUND: 503,
    ErrorCode.MODEL_LOAD_FAILED: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.ENGINE_FAILED: 503,
    ErrorCode.DEADLINE: 504,
    ErrorCode.INTERNAL: 500,
}
# Where OpenAI's API has a code of its own for the same condition, clients look for that one.
OPENAI_CODES = {ErrorCode.UNKNOWN_ENGINE: "model_not_found", ErrorCode.CONTEXT_OVERFLOW: "context_length_exceeded"}
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")  # the protocol's messages begin with the field they are about


class ApiError(Exception):
    """An error answer: the HTTP status and OpenAI's ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, code: str | None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = (
            "rate_limit_error"
            if self.status == 429
            else "invalid_request_error"
            if self.status < 500
            else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(param: str | None, problem: str, code: str = ErrorCode.INVALID_REQUEST) -> ApiError:
    return ApiError(400, f"{param}: {problem}" if param else problem, code, param)


def error_from_event(event: dict[str, Any], renamed: dict[str, str]) -> ApiError:
    """The protocol's error event as an OpenAI error; ``renamed`` maps protocol fields back to the request's names."""
    code, message = str(event.get("code")), str(event.get("message", ""))
    status = STATUS.get(code, 500)
    param = None
    if status == 400 and (match := _FIELD.match(message)):
        param = match.group(1)
        base = re.split(r"[.\[]", param, maxsplit=1)[0]
        if base in renamed:
            param = renamed[base] + param[len(base) :]
            message = param + message[match.end() - 2 :]
    elif code == ErrorCode.UNKNOWN_ENGINE:
        param = "model"
    return ApiError(status, message, OPENAI_CODES.get(code, code), param)


@dataclass
class Request:
    """A request body as a generate op, and what its answer needs."""

    message: dict[str, Any]  # the generate op, without its id
    model: str  # what the answer's `model` says: the name asked for
    stream: bool
    include_usage: bool
    renamed: dict[str, str]  # protocol field -> the request's name for it, for error params
    n: int = 1  # choices asked for: generate ops, seeds seed, seed + 1, ... (engine_for_choices)


def resolve_model(model: Any, engines: dict[str, EngineConfig]) -> str | None:
    """The engine a `model` names (its name or an alias); None: the daemon chooses."""
    if model is None or (model == DEFAULT_MODEL and DEFAULT_MODEL not in engines):
        return None
    if not isinstance(model, str):
        raise bad_request("model", "must be a string")
    if model in engines:
        return model
    for name, config in engines.items():
        if model in config.aliases:
            return name
    raise unknown_model(model, engines)


def unknown_model(model: str, engines: dict[str, EngineConfig]) -> ApiError:
    known = ", ".join(model_names(engines))
    return ApiError(
        404,
        f"The model {ascii(model[:128])} does not exist; the models are: {known} (or {DEFAULT_MODEL!r})",
        "model_not_found",
        "model",
    )


def model_names(engines: dict[str, EngineConfig]) -> list[str]:
    return [*engines, *(alias for config in engines.values() for alias in config.aliases)]


def parse_request(kind: str, body: dict[str, Any], engines: dict[str, EngineConfig], max_tokens_limit: int) -> Request:
    """A chat or completions body as a generate op; ApiError for what the daemon does not do."""
    _check_fields(kind, body)
    engine = resolve_model(body.get("model"), engines)
    stream = _stream(body)
    message: dict[str, Any] = {"op": p.OP_GENERATE, "stream": stream}
    if engine is not None:
        message["engine"] = engine
    renamed: dict[str, str] = {}
    if kind == CHAT:
        message["messages"] = [
            _chat_message(i, item) for i, item in enumerate(_non_empty_list(body.get("messages"), "messages"))
        ]
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is not None:
            renamed["max_tokens"] = "max_completion_tokens"
        else:
            max_tokens = body.get("max_tokens")
    else:
        message["prompt"] = _prompt(body.get("prompt"))
        max_tokens = body.get("max_tokens", min(COMPLETIONS_DEFAULT_MAX_TOKENS, max_tokens_limit))
    if max_tokens is not None:
        message["max_tokens"] = max_tokens
    message.update((key, body[key]) for key in PASSED if body.get(key) is not None)
    if kind == COMPLETIONS and body.get("logprobs") is not None:
        message.update(logprobs=True, top_logprobs=_completions_logprobs(body["logprobs"]))
        renamed["top_logprobs"] = "logprobs"
    model = body.get("model") or DEFAULT_MODEL
    n = _choices(body)
    return Request(message, model, stream, stream and _include_usage(body), renamed, n)


def _completions_logprobs(value: Any) -> int:
    """The legacy API's logprobs: how many alternatives each token lists (0: only the chosen token's)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COMPLETIONS_LOGPROBS:
        raise bad_request("logprobs", f"must be an integer from 0 to {MAX_COMPLETIONS_LOGPROBS}")
    return value


def _choices(body: dict[str, Any]) -> int:
    """``n``; completions' ``best_of`` only where it asks for nothing more (the server ranks no choices)."""
    n = body.get("n")
    if n is None:
        n = 1
    elif isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= p.MAX_SLOTS:
        raise bad_request("n", f"must be an integer from 1 to {p.MAX_SLOTS}")
    best_of = body.get("best_of")
    if best_of is not None and not (not isinstance(best_of, bool) and best_of in (1, n)):
        raise bad_request("best_of", "not supported by this server unless 1 or equal to n (it ranks no choices)")
    return n


def choice_ops(message: dict[str, Any], op_ids: list[str]) -> list[dict[str, Any]]:
    """The generate op of each choice: choice i samples with seed + i when a seed is given (so the choices
    differ, and the same seed gives the same choices again), else each with a fresh seed of its own."""
    seed = message.get("seed")
    if len(op_ids) == 1 or not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        return [{**message, "id": op_id} for op_id in op_ids]
    return [{**message, "id": op_id, "seed": (seed + i) % 2**32} for i, op_id in enumerate(op_ids)]


def engine_for_choices(n: int, pinned: str | None, status: dict[str, Any], engines: dict[str, EngineConfig]) -> str:
    """The engine whose slots run ``n`` choices of one request together: the named one, else the first by
    priority that takes traffic.  An engine's slots are its ready message's, or (not loaded yet) its
    ``parallel``; none with n -> ``unsupported_parameter`` naming the engines considered and their slots."""
    described = {e["name"]: e for e in status.get("engines", ())}
    names = [pinned] if pinned is not None else sorted(engines, key=lambda name: engines[name].priority)
    considered: list[tuple[str, int]] = []
    for name in names:
        entry = described.get(name, {})
        if pinned is None and not entry.get("available", True):
            continue
        slots = entry.get("slots", 1) if entry.get("state") == "ready" else engines[name].parallel
        if slots >= n:
            return name
        considered.append((name, slots))
    listed = ", ".join(f"{name} ({slots} slot{'s' if slots != 1 else ''})" for name, slots in considered) or "none"
    raise bad_request(
        "n",
        f"needs an engine that generates {n} sequences at once (its parallel); the engines considered are: {listed}",
        ErrorCode.UNSUPPORTED_PARAMETER,
    )


def _check_fields(kind: str, body: dict[str, Any]) -> None:
    for key, value in body.items():
        if key not in FIELDS[kind]:
            raise bad_request(ascii(key)[1:-1], "unrecognized request argument")
        accepted = REFUSED_UNLESS.get(key)
        if accepted is not None and value is not None and not any(_same(value, a) for a in accepted):
            raise bad_request(key, "not supported by this server")


def _same(value: Any, accepted: Any) -> bool:
    """Equal and of the same kind (JSON true is not the number 1)."""
    return value == accepted and isinstance(value, bool) == isinstance(accepted, bool)


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream", "must be true or false")
    if not stream and body.get("stream_options") is not None:
        raise bad_request("stream_options", "only allowed when stream is true")
    return bool(stream)


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad_request("stream_options", "must be an object with at most include_usage")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request("stream_options.include_usage", "must be true or false")
    return include


def _non_empty_list(value: Any, param: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise bad_request(param, "must be a non-empty array")
    return value


def _chat_message(i: int, item: Any) -> dict[str, Any]:
    """One chat message: a role the daemon knows (developer is system) and text content; a tool result's
    tool_call_id; an assistant's tool_calls (content then may be null), their arguments decoded."""
    if not isinstance(item, dict):
        raise bad_request(f"messages[{i}]", "must be an object with role and content")
    role = CHAT_ROLES.get(item.get("role")) if isinstance(item.get("role"), str) else None
    if role is None:
        raise bad_request(f"messages[{i}].role", "must be system, developer, user, assistant or tool")
    extra = _ROLE_FIELDS.get(role, ())
    for key, value in item.items():
        if key not in ("role", "content", *extra) and value is not None:
            raise bad_request(f"messages[{i}].{ascii(key)[1:-1]}", "not supported by this server")
    calls = item.get("tool_calls") if role == "assistant" else None
    content = None if calls and item.get("content") is None else _content(i, item.get("content"))
    out: dict[str, Any] = {"role": role, "content": content}
    if role == "tool" and item.get("tool_call_id") is not None:
        out["tool_call_id"] = item["tool_call_id"]
    if calls:
        out["tool_calls"] = [_tool_call(f"messages[{i}].tool_calls[{j}]", call) for j, call in enumerate(calls)]
    return out


def _tool_call(key: str, call: Any) -> Any:
    """An assistant's earlier call with its arguments (a JSON string) as the object the protocol takes; the
    rest of its shape the protocol checks."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call  # the protocol's check names what is wrong
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        raise bad_request(f"{key}.function.arguments", "must be a JSON object in a string") from None
    if not isinstance(arguments, dict):
        raise bad_request(f"{key}.function.arguments", "must be a JSON object in a string")
    # What a client's own model of a call adds as null (its SDK's optional fields) is left out.
    kept = {k: v for k, v in call.items() if v is not None}
    return {**kept, "function": {**{k: v for k, v in function.items() if v is not None}, "arguments": arguments}}


def _content(i: int, content: Any) -> str:
    """A string, or an array of text parts (joined by newlines); images and audio are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"messages[{i}].content", "must be a string or an array of text parts")
    texts = []
    for j, part in enumerate(content):
        if (
            not isinstance(part, dict)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
            or set(part) != {"type", "text"}
        ):
            raise bad_request(f"messages[{i}].content[{j}]", 'only {"type": "text", "text": ...} parts are supported')
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt(prompt: Any) -> str:
    """A string, or an array holding one string; several prompts and token arrays are refused."""
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("prompt", "must be a string (several prompts and token arrays are not supported)")
    return prompt
