"""The bodies of Ollama's answers: the NDJSON lines of a stream, the whole object, the final fields
(``done_reason`` and the durations in nanoseconds, from the daemon's usage and timings), the model listings.
No I/O.

A token event becomes one line without being decoded (answers.token_literal), as OpenAI's chunks do.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any

from workers import protocol as p

from .answers import token_literal
from .ollama import CHAT, error_body
from .embeddings import vectors_of
from .openai import ApiError

NDJSON_HEADERS = [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache")]
FOREVER = "2318-08-17T00:00:00Z"  # what Ollama's ps says of a model kept for ever (keep_alive < 0)


def timestamp(epoch_s: float | None = None) -> str:
    """RFC 3339 in UTC with microseconds, as Ollama writes created_at and modified_at."""
    moment = datetime.fromtimestamp(time.time() if epoch_s is None else epoch_s, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def _ns(ms: Any) -> int:
    return max(0, round(ms * 1_000_000)) if isinstance(ms, (int, float)) else 0


def final_fields(done: dict[str, Any]) -> dict[str, Any]:
    """What Ollama's last object says of the run: why it ended and how long each part took (nanoseconds)."""
    timings, usage = done.get("timings") or {}, done.get("usage") or {}
    total, ttft = timings.get("total_ms"), timings.get("ttft_ms")
    prefill = timings.get("prefill_ms")
    if prefill is None and ttft is not None:
        prefill = ttft - (timings.get("queued_ms") or 0)
    return {
        "done": True,
        "done_reason": done.get("finish_reason"),
        "total_duration": _ns(total),
        "load_duration": _ns(timings.get("load_ms")),
        "prompt_eval_count": usage.get("prompt_tokens") or 0,
        "prompt_eval_duration": _ns(prefill),
        "eval_count": usage.get("completion_tokens") or 0,
        "eval_duration": _ns(total - ttft) if total is not None and ttft is not None else 0,
    }


class OllamaAnswer:
    """How one /api/chat or /api/generate request is answered (exchange.GenerationAnswer drives it)."""

    stream_headers = NDJSON_HEADERS

    n = 1  # Ollama's API has no choices: one generate op, the request's own id

    def __init__(self, kind: str, request_id: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.event_prefix = p.token_event_prefix(request_id)
        self.op_ids = [request_id]
        self.choice_of, self.index_of = {self.event_prefix: 0}, {request_id: 0}
        self._head = b'{"model":%s,"created_at":"' % p.encode_string(model)
        if kind == CHAT:
            self._text_head, self._tail = b'","message":{"role":"assistant","content":', b'},"done":false}\n'
        else:
            self._text_head, self._tail = b'","response":', b',"done":false}\n'
        self._stamp_at, self._stamp = -1, b""

    def _now(self) -> bytes:
        """created_at, formatted again only when the clock has moved by a millisecond."""
        now = time.time()
        if int(now * 1000) != self._stamp_at:
            self._stamp_at, self._stamp = int(now * 1000), timestamp(now).encode()
        return self._stamp

    def opening(self) -> bytes:
        return b""

    def token_chunk(self, event: bytes, index: int = 0) -> bytes:
        literal = token_literal(event, len(self.event_prefix))
        return self._head + self._now() + self._text_head + literal + self._tail

    def choice_end(self, done: dict[str, Any], index: int) -> bytes:
        """The last lines: the tool calls when the model made some (a line of their own, as Ollama sends
        them before its last), then no text and the final fields."""
        calls = b""
        if done.get("tool_calls") and self.kind == CHAT:
            message = {"role": "assistant", "content": "", "tool_calls": ollama_tool_calls(done["tool_calls"])}
            calls = _line({"model": self.model, "created_at": timestamp(), "message": message, "done": False})
        return calls + _line(self._whole_one({**done, "text": "", "tool_calls": None}))

    def closing(self, dones: list[dict[str, Any]]) -> bytes:
        return b""  # the final fields went with the choice's end

    def stream_error(self, error: ApiError) -> bytes:
        return _line(error_body(error))

    def error_body(self, error: ApiError) -> dict[str, Any]:
        return error_body(error)

    def whole(self, dones: list[dict[str, Any]]) -> dict[str, Any]:
        return self._whole_one(dones[0])

    def _whole_one(self, done: dict[str, Any]) -> dict[str, Any]:
        body = {**self.text(done.get("text", "")), **final_fields(done)}
        if done.get("tool_calls") and self.kind == CHAT:
            body["message"]["tool_calls"] = ollama_tool_calls(done["tool_calls"])
        return body

    def text(self, text: str) -> dict[str, Any]:
        """The fields before the final ones: the model, the time, the text as Ollama's kind places it."""
        body: dict[str, Any] = {"model": self.model, "created_at": timestamp()}
        if self.kind == CHAT:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        return body

    def residency(self, reason: str) -> dict[str, Any]:
        """The answer of a load (an empty prompt) or an unload (the same with keep_alive 0)."""
        return {**self.text(""), "done": True, "done_reason": reason}


def ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The protocol's tool calls as Ollama's: ``{"id", "function": {"index", "name", "arguments"}}``, the
    arguments an object."""
    return [
        {
            "id": call["id"],
            "function": {"index": i, "name": call["function"]["name"], "arguments": call["function"]["arguments"]},
        }
        for i, call in enumerate(calls)
    ]


def embed_answer(model: str, event: dict[str, Any], legacy: bool, dimensions: int | None) -> dict[str, Any]:
    """The embeddings event as /api/embed's answer (``legacy``: /api/embeddings', one vector); ApiError for an
    error event, or dimensions the model does not have."""
    vectors = vectors_of(event, dimensions)
    if legacy:
        return {"embedding": vectors[0] if vectors else []}
    timings = event.get("timings") or {}
    return {
        "model": model,
        "embeddings": vectors,
        "total_duration": _ns(timings.get("total_ms")),
        "load_duration": _ns(timings.get("load_ms")),
        "prompt_eval_count": (event.get("usage") or {}).get("prompt_tokens") or 0,
    }


def details(model_file: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    """Ollama's ``details`` from what the daemon read of the model's file (the ps op's ``file``)."""
    if model_file is None:
        return {"parent_model": "", "format": kind, "family": kind, "families": [kind]}
    family = model_file["architecture"]
    return {
        "parent_model": "",
        "format": model_file["format"],
        "family": family,
        "families": [family],
        "parameter_size": parameter_size(model_file.get("parameters")),
        "quantization_level": model_file.get("file_type")
        or (f"{model_file['bits']:g}bpw" if model_file.get("bits") else ""),
    }


def parameter_size(count: int | None) -> str:
    """Ollama's way: 268098176 -> "268.10M", 7241732096 -> "7.2B"."""
    if not count:
        return ""
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    return f"{count / 1e3:.2f}K"


def digest(model_file: dict[str, Any] | None, name: str) -> str:
    """An identity of the model's file (path, size, time), as a sha256 hex string: it changes when the file
    does.  Not the hash of the content (reading a model of many GB for a listing would take minutes)."""
    if model_file is None:
        key = f"engine:{name}"
    else:
        key = f"{model_file['path']}:{model_file['bytes']}:{model_file['modified']}"
    return hashlib.sha256(key.encode()).hexdigest()


def model_info(model_file: dict[str, Any] | None) -> dict[str, Any]:
    """/api/show's model_info: the GGUF keys that the daemon read, under Ollama's (GGUF's) names."""
    if model_file is None:
        return {}
    arch = model_file["architecture"]
    info: dict[str, Any] = {"general.architecture": arch, "general.file_type": model_file.get("file_type")}
    if model_file.get("parameters"):
        info["general.parameter_count"] = model_file["parameters"]
    for key, name in (
        ("n_ctx_train", "context_length"),
        ("n_embd", "embedding_length"),
        ("n_layer", "block_count"),
        ("n_head", "attention.head_count"),
        ("n_head_kv", "attention.head_count_kv"),
        ("n_vocab", "vocab_size"),
    ):
        if model_file.get(key) is not None:
            info[f"{arch}.{name}"] = model_file[key]
    return info
