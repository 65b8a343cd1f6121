"""Ollama's HTTP API in the protocol's terms: `/api/chat` and `/api/generate` bodies become generate ops,
`options`, `format` and `keep_alive` the protocol's fields, errors Ollama's ``{"error": message}``.  No I/O.

As openai.py does for OpenAI's API, ranges and types are left to the protocol's own validation
(core/validate.py), whose messages name the field; this module renames (``RENAMED`` turns the protocol's
field names in those messages back into Ollama's), and refuses what Ollama's API has and the daemon does not
do with a 400 naming the field.  docs/HTTP.md has the table of every field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from workers import protocol as p

from ...config import EngineConfig
from .openai import DEFAULT_MODEL, ApiError, bad_request

GENERATE = "generate"
CHAT = "chat"

# Ollama's sampling options as the generate op's fields.
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "num_predict": "max_tokens",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_last_n": "penalty_last_n",
}
# How a model is loaded (context, batch, GPU layers, threads, memory mapping): an engine's own settings in the
# configuration (docs/CONFIG.md), the same for every request it serves: accepted and ignored, as Ollama itself
# ignores them for a model already loaded.  mirostat_tau and mirostat_eta only act with mirostat, which is off.
IGNORED_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "numa",
        "num_thread",
        "use_mmap",
        "use_mlock",
        "vocab_only",
        "logits_all",
        "embedding_only",
        "f16_kv",
        "num_keep",
        "penalize_newline",
        "mirostat_tau",
        "mirostat_eta",
    }
)
# Samplers no engine here has: refused unless the value that turns them off, since the text would not be
# what was asked for.
REFUSED_OPTIONS: dict[str, tuple[Any, ...]] = {"mirostat": (0,), "tfs_z": (1,), "typical_p": (1,)}
# Top-level fields refused unless absent, null or one of these values (which change nothing).
REFUSED_FIELDS: dict[str, dict[str, tuple[Any, ...]]] = {
    GENERATE: {
        "suffix": ("",),
        "template": ("",),
        "context": ([],),
        "images": ([],),
        "think": (False,),
        "logprobs": (False,),
        "top_logprobs": (0,),
        "width": (),
        "height": (),
        "steps": (),
    },
    CHAT: {"think": (False,), "logprobs": (False,), "top_logprobs": (0,)},
}
FIELDS = {
    GENERATE: frozenset({"model", "prompt", "system", "raw", "stream", "format", "options", "keep_alive"}),
    CHAT: frozenset({"model", "messages", "tools", "stream", "format", "options", "keep_alive"}),
}
# /api/embed and the older /api/embeddings (one prompt, one vector).
EMBED_FIELDS = frozenset({"model", "input", "truncate", "options", "keep_alive", "dimensions"})
LEGACY_EMBED_FIELDS = frozenset({"model", "prompt", "options", "keep_alive"})
# The roles of chat messages, and the fields each may carry.
MESSAGE_FIELDS = {
    "system": frozenset({"role", "content"}),
    "user": frozenset({"role", "content"}),
    # a past answer's thinking is not part of the prompt; its tool calls are
    "assistant": frozenset({"role", "content", "thinking", "tool_calls"}),
    "tool": frozenset({"role", "content", "tool_name", "tool_call_id"}),  # a tool's result
}
# The protocol's fields as Ollama's requests name them, for the params of error messages.
RENAMED = {
    **{field: f"options.{name}" for name, field in OPTIONS.items()},
    "response_format": "format",
    "keep_alive": "keep_alive",
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass
class Request:
    """An Ollama body as a generate op, and what its answer needs."""

    message: dict[str, Any]  # the generate op without its id; no prompt or messages: a load or unload
    model: str  # the name asked for, as the answer's `model` says it
    engine: str | None  # the engine it names (None: the daemon chooses)
    stream: bool
    dimensions: int | None = None  # an embed request's: the size it expects

    @property
    def residency_only(self) -> bool:
        """Ollama's load (an empty prompt or no messages) and unload (the same with keep_alive 0)."""
        return "prompt" not in self.message and "messages" not in self.message


def error_body(error: ApiError) -> dict[str, str]:
    return {"error": error.message}


def unknown_model(model: str) -> ApiError:
    """Ollama's words, which its clients show as they are."""
    return ApiError(
        404, f'model "{ascii(model[:128])[1:-1]}" not found, try pulling it first', "model_not_found", "model"
    )


def resolve(model: Any, engines: dict[str, EngineConfig]) -> str | None:
    """The engine a model name (or alias) names; Ollama's implicit ``:latest`` tag is the name itself.
    None: ``default``, the daemon chooses."""
    if not isinstance(model, str) or not model:
        raise bad_request("model", "must be the name of a model")
    if model == DEFAULT_MODEL and DEFAULT_MODEL not in engines:
        return None
    for name in (model, model.removesuffix(":latest")):
        if name in engines:
            return name
        for engine, config in engines.items():
            if name in config.aliases:
                return engine
    raise unknown_model(model)


def parse_request(kind: str, body: dict[str, Any], engines: dict[str, EngineConfig], max_tokens_limit: int) -> Request:
    """An /api/generate or /api/chat body as a generate op; ApiError for what the daemon does not do.
    Without num_predict (or with a negative one) the model writes until it stops, as Ollama's does, up to
    the daemon's ``max_tokens_limit``."""
    _check_fields(kind, body)
    engine = resolve(body.get("model"), engines)
    stream = body.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise bad_request("stream", "must be true or false")
    message: dict[str, Any] = {"op": p.OP_GENERATE, "stream": stream}
    if engine is not None:
        message["engine"] = engine
    if kind == GENERATE:
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise bad_request("prompt", "must be a string")
        if not isinstance(body.get("raw", False), (bool, type(None))):
            raise bad_request("raw", "must be true or false")
        if body.get("system"):
            raise bad_request(
                "system",
                "not supported: /api/generate sends the prompt to the model as it is (as raw: true); "
                "put a system message in /api/chat, or write it into the prompt",
            )
        if prompt:
            message["prompt"] = prompt
    else:
        messages = body.get("messages")
        if messages is not None and not isinstance(messages, list):
            raise bad_request("messages", "must be an array of messages")
        if messages:
            message["messages"] = [chat_message(i, item) for i, item in enumerate(messages)]
        if body.get("tools"):  # OpenAI's function tools, as Ollama's are: checked by the protocol
            message["tools"] = body["tools"]
    message.update(options(body.get("options")))
    message.setdefault("max_tokens", max_tokens_limit)
    if (response_format := format_of(body.get("format"))) is not None:
        message["response_format"] = response_format
    if body.get("keep_alive") is not None:
        message["keep_alive"] = keep_alive(body["keep_alive"])
    return Request(message, body["model"], engine, stream)


def _check_fields(kind: str, body: dict[str, Any]) -> None:
    refused = REFUSED_FIELDS[kind]
    for key, value in body.items():
        if key in refused:
            if value is not None and not any(_same(value, accepted) for accepted in refused[key]):
                raise bad_request(key, _refusal(key))
        elif key not in FIELDS[kind]:
            raise bad_request(ascii(key)[1:-1], "unrecognized request argument")


def _refusal(key: str) -> str:
    why = {
        "template": "not supported: the engine's own chat template is used (/api/chat); no per-request template",
        "images": "not supported: no engine here takes images",
        "think": "not supported: no engine here separates thinking from the answer (false or absent only)",
        "context": "not supported: send the conversation as /api/chat messages",
    }
    return why.get(key, "not supported by this server")


def _same(value: Any, accepted: Any) -> bool:
    """Equal and of the same kind (JSON true is not the number 1)."""
    return value == accepted and isinstance(value, bool) == isinstance(accepted, bool)


def chat_message(i: int, item: Any) -> dict[str, Any]:
    """One chat message as the protocol's ``{"role", "content"}``; images are refused, a past answer's
    ``thinking`` is dropped.  A past answer's ``tool_calls`` (arguments an object, as the protocol's) and a
    tool's result (role ``tool``; its ``tool_name`` is Ollama's alone, dropped) pass on."""
    if not isinstance(item, dict):
        raise bad_request(f"messages[{i}]", "must be an object with role and content")
    role = item.get("role")
    allowed = MESSAGE_FIELDS.get(role) if isinstance(role, str) else None
    if allowed is None:
        raise bad_request(f"messages[{i}].role", "must be system, user, assistant or tool")
    for key, value in item.items():
        if key not in allowed and value not in (None, [], ""):
            problem = "not supported: no engine here takes images" if key == "images" else "not supported"
            raise bad_request(f"messages[{i}].{ascii(key)[1:-1]}", problem)
    content = item.get("content", "")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise bad_request(f"messages[{i}].content", "must be a string")
    out: dict[str, Any] = {"role": role, "content": content}
    if role == "tool" and item.get("tool_call_id") is not None:
        out["tool_call_id"] = item["tool_call_id"]
    if role == "assistant" and item.get("tool_calls"):
        calls = item["tool_calls"]
        if not isinstance(calls, list):
            raise bad_request(f"messages[{i}].tool_calls", "must be an array of calls")
        out["tool_calls"] = [_past_call(f"messages[{i}].tool_calls[{j}]", call) for j, call in enumerate(calls)]
    return out


def _past_call(where: str, call: Any) -> dict[str, Any]:
    """A call in history, ``{"function": {"name", "arguments"}}`` (Ollama adds ``index``; an ``id`` is kept)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise bad_request(f"{where}.function", "must be an object with name and arguments")
    out: dict[str, Any] = {"function": {"name": function.get("name"), "arguments": function.get("arguments") or {}}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def parse_embed(body: dict[str, Any], engines: dict[str, EngineConfig], legacy: bool) -> Request:
    """An /api/embed body (``legacy``: /api/embeddings, one ``prompt``) as an embed op.  ``truncate`` is
    accepted, but an input longer than the model's context is refused (400), never cut; ``dimensions`` must be
    the model's own (checked on the answer, as /v1/embeddings does)."""
    fields = LEGACY_EMBED_FIELDS if legacy else EMBED_FIELDS
    for key in body:
        if key not in fields:
            raise bad_request(ascii(key)[1:-1], "unrecognized request argument")
    engine = resolve(body.get("model"), engines)
    value = body.get("prompt") if legacy else body.get("input")
    if legacy and not isinstance(value, str):
        raise bad_request("prompt", "must be a string")
    message: dict[str, Any] = {"op": p.OP_EMBED, "input": value}
    if engine is not None:
        message["engine"] = engine
    if body.get("keep_alive") is not None:
        message["keep_alive"] = keep_alive(body["keep_alive"])
    settings = body.get("options")  # sampling and load options mean nothing to an embedding: taken, unused
    if settings is not None and not isinstance(settings, dict):
        raise bad_request("options", "must be an object")
    for key in settings or {}:
        if key not in IGNORED_OPTIONS and key not in OPTIONS:
            raise bad_request(f"options.{ascii(key)[1:-1]}", "unrecognized option")
    dimensions = body.get("dimensions")
    if dimensions is not None and not _is_int(dimensions):
        raise bad_request("dimensions", "must be an integer")
    return Request(message, body["model"], engine, False, dimensions)


def options(value: Any) -> dict[str, Any]:
    """Ollama's ``options`` as the generate op's sampling fields (their values checked by the protocol)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request("options", "must be an object")
    fields: dict[str, Any] = {}
    for key, item in value.items():
        if item is None or key in IGNORED_OPTIONS:
            continue
        if key in OPTIONS:
            fields[OPTIONS[key]] = item
        elif key in REFUSED_OPTIONS:
            if not any(_same(item, accepted) for accepted in REFUSED_OPTIONS[key]):
                raise bad_request(f"options.{key}", "not supported: no engine here has this sampler")
        else:
            raise bad_request(f"options.{ascii(key)[1:-1]}", "unrecognized option")
    if fields.get("max_tokens") is not None and _is_int(fields["max_tokens"]) and fields["max_tokens"] < 0:
        del fields["max_tokens"]  # Ollama's -1 (and -2): until the model stops, up to the daemon's limit
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    return fields


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def format_of(value: Any) -> dict[str, Any] | None:
    """``format``: "json" is any JSON object, a JSON schema object constrains the output to it."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise bad_request("format", 'must be "json" or a JSON schema (an object)')


def keep_alive(value: Any) -> float:
    """Ollama's keep_alive as seconds: a number of seconds, or a Go duration ("5m", "1h30m", "30s", "0");
    negative: for ever (-1).  Its upper bound is the protocol's."""
    if _is_int(value) or isinstance(value, float):
        seconds = float(value)
    elif isinstance(value, str) and (seconds_of := _duration(value.strip())) is not None:
        seconds = seconds_of
    else:
        raise bad_request("keep_alive", 'must be a number of seconds or a duration such as "5m" (negative: for ever)')
    if not math.isfinite(seconds):
        raise bad_request("keep_alive", "must be a finite number of seconds")
    return -1.0 if seconds < 0 else seconds


def _duration(text: str) -> float | None:
    """Go's time.ParseDuration (as Ollama reads keep_alive), and a bare number of seconds."""
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if re.fullmatch(r"\d+(?:\.\d+)?", body):
        return sign * float(body)
    if not body or body == "0":
        return 0.0 if body == "0" else None
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(body):
        if match.start() != position:
            return None
        total += float(match[1]) * _UNIT_S[match[2]]
        position = match.end()
    return sign * total if position == len(body) else None
