"""The bodies of OpenAI's answers: whole responses, and the server-sent events of a stream.

A token event of the protocol becomes one SSE chunk without being decoded:
the text's JSON string literal is copied from the event into a chunk whose
beginning and end were built once for the request, so a streamed token
costs two slices and one concatenation here.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from workers import protocol as p

from .openai import CHAT, ApiError

DONE = b"data: [DONE]\n\n"
_INDEX = b',"index":'  # what follows the text literal in a token event
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class StreamAnswer(Protocol):
    """How one API writes a generation's answer (exchange.GenerationAnswer drives it): OpenAI's here, Ollama's
    in ollama_answers.py."""

    event_prefix: bytes  # the protocol's token events of this request begin with it
    stream_headers: list[tuple[bytes, bytes]]

    def opening(self) -> bytes: ...
    def token_chunk(self, event: bytes) -> bytes: ...
    def closing(self, done: dict[str, Any]) -> bytes: ...
    def stream_error(self, error: ApiError) -> bytes: ...
    def whole(self, done: dict[str, Any]) -> dict[str, Any]: ...
    def error_body(self, error: ApiError) -> dict[str, Any]: ...


def token_literal(event: bytes, prefix_length: int) -> bytes:
    """A protocol token event's text as its JSON string literal (``event_prefix``, the literal,
    ``,"index":N}``): copied into an answer's chunk as it is, never decoded."""
    return event[prefix_length : event.rindex(_INDEX)]


def _sse(payload: dict[str, Any]) -> bytes:
    # json.dumps escapes line breaks inside strings: one event is one `data:` line.
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n\n"


def sse_error(error: ApiError) -> bytes:
    """An error in the middle of a stream: the last event (OpenAI's clients raise it as an APIError)."""
    return _sse(error.body())


class Answer:
    """How one request is answered in OpenAI's API: its completion id, the `model` it names, chat or completions."""

    stream_headers = SSE_HEADERS

    def __init__(self, kind: str, request_id: str, model: str, created: int, include_usage: bool) -> None:
        self.kind, self.request_id, self.model, self.created, self.include_usage = (
            kind,
            request_id,
            model,
            created,
            include_usage,
        )
        self.event_prefix = p.token_event_prefix(request_id)
        self._object = "chat.completion" if kind == CHAT else "text_completion"
        chunk_object = "chat.completion.chunk" if kind == CHAT else "text_completion"
        head = b'data: {"id":%s,"object":"%s","created":%d,"model":%s,"choices":[{"index":0,' % (
            p.encode_string(request_id),
            chunk_object.encode(),
            created,
            p.encode_string(model),
        )
        if kind == CHAT:
            self._token_head, self._token_tail = (
                head + b'"delta":{"content":',
                b'},"logprobs":null,"finish_reason":null}]}\n\n',
            )
        else:
            self._token_head, self._token_tail = head + b'"text":', b',"logprobs":null,"finish_reason":null}]}\n\n'

    def token_chunk(self, event: bytes) -> bytes:
        """A protocol token event (``event_prefix``, the text literal, ``,"index":N}``) as one SSE chunk."""
        return self._token_head + token_literal(event, len(self.event_prefix)) + self._token_tail

    def stream_error(self, error: ApiError) -> bytes:
        return sse_error(error)

    def error_body(self, error: ApiError) -> dict[str, Any]:
        return error.body()

    def opening(self) -> bytes:
        """Before the first token: chat streams name the role first, as OpenAI's do."""
        if self.kind != CHAT:
            return b""
        return _sse(
            self._chunk(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
        )

    def closing(self, done: dict[str, Any]) -> bytes:
        """After the last token: the tool calls (whole, one delta for all), the finish reason, the usage when
        asked for, ``[DONE]``."""
        reason = done.get("finish_reason")
        choice: dict[str, Any] = {"index": 0, "delta": {}} if self.kind == CHAT else {"index": 0, "text": ""}
        parts = []
        if done.get("tool_calls"):
            calls = [{"index": i, **call} for i, call in enumerate(openai_tool_calls(done["tool_calls"]))]
            delta = {"index": 0, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}
            parts.append(_sse(self._chunk([delta])))
        parts.append(_sse(self._chunk([{**choice, "logprobs": None, "finish_reason": reason}])))
        if self.include_usage:
            parts.append(_sse({**self._chunk([]), "usage": usage(done)}))
        parts.append(DONE)
        return b"".join(parts)

    def whole(self, done: dict[str, Any]) -> dict[str, Any]:
        """The answer of a request that did not stream: the protocol's done event with its ``text``."""
        text, reason = done.get("text", ""), done.get("finish_reason")
        if self.kind == CHAT:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if done.get("tool_calls"):
                message = {
                    "role": "assistant",
                    "content": text or None,
                    "tool_calls": openai_tool_calls(done["tool_calls"]),
                }
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {
            "id": self.request_id,
            "object": self._object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(done),
        }

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.kind == CHAT else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model, "choices": choices}


def openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The protocol's tool calls as OpenAI's: the arguments object as a JSON string."""
    return [
        {
            "id": call["id"],
            "type": "function",
            "function": {
                "name": call["function"]["name"],
                "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False),
            },
        }
        for call in calls
    ]


def usage(done: dict[str, Any]) -> dict[str, int]:
    """OpenAI's usage from the done event's (a count the daemon could not know is 0)."""
    counts = done.get("usage") or {}
    prompt, completion = counts.get("prompt_tokens") or 0, counts.get("completion_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
