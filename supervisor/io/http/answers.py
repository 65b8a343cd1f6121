"""The bodies of OpenAI's answers: whole responses, and the server-sent events of a stream.

A token event of the protocol becomes one SSE chunk without being decoded:
the text's JSON string literal is copied from the event into a chunk whose
beginning and end were built once for the request, so a streamed token
costs two slices and one concatenation here.  A request that asked for
logprobs takes the general way (its events carry entries to reshape).

An answer has ``n`` choices (``n`` > 1: one generate op each, ids
:func:`choice_id`); each event goes to the choice its op's id names.
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
    in ollama_answers.py.  ``op_ids``: the generate ops of its choices, in order; a token event's choice is
    found by its beginning (``choice_of``), a done event's by its id (``index_of``)."""

    event_prefix: bytes  # the protocol's token events of this request's first choice begin with it
    stream_headers: list[tuple[bytes, bytes]]
    n: int
    op_ids: list[str]
    choice_of: dict[bytes, int]
    index_of: dict[str, int]

    def opening(self) -> bytes: ...
    def token_chunk(self, event: bytes, index: int = 0) -> bytes: ...
    def choice_end(self, done: dict[str, Any], index: int) -> bytes: ...
    def closing(self, dones: list[dict[str, Any]]) -> bytes: ...
    def stream_error(self, error: ApiError) -> bytes: ...
    def whole(self, dones: list[dict[str, Any]]) -> dict[str, Any]: ...
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


def choice_id(request_id: str, index: int, n: int) -> str:
    """The generate op id of choice ``index``: the request's own for one choice, else all of one length."""
    return request_id if n == 1 else f"{request_id}.{index:02d}"


class Answer:
    """How one request is answered in OpenAI's API: its completion id, the `model` it names, chat or completions."""

    stream_headers = SSE_HEADERS

    def __init__(
        self,
        kind: str,
        request_id: str,
        model: str,
        created: int,
        include_usage: bool,
        n: int = 1,
        logprobs: bool = False,
    ) -> None:
        self.kind, self.request_id, self.model, self.created, self.include_usage = (
            kind,
            request_id,
            model,
            created,
            include_usage,
        )
        self.n, self.logprobs = n, logprobs
        self.op_ids = [choice_id(request_id, i, n) for i in range(n)]
        self.event_prefix = p.token_event_prefix(self.op_ids[0])
        # a token event's choice, by its beginning (the prefixes are all of one length)
        self.choice_of = {p.token_event_prefix(op_id): i for i, op_id in enumerate(self.op_ids)}
        self.index_of = {op_id: i for i, op_id in enumerate(self.op_ids)}
        self._offsets = [0] * n  # completions' text_offset: characters before each choice's next token
        self._object = "chat.completion" if kind == CHAT else "text_completion"
        chunk_object = "chat.completion.chunk" if kind == CHAT else "text_completion"
        head = b'data: {"id":%s,"object":"%s","created":%d,"model":%s,"choices":[{"index":' % (
            p.encode_string(request_id),
            chunk_object.encode(),
            created,
            p.encode_string(model),
        )
        text_key = b',"delta":{"content":' if kind == CHAT else b',"text":'
        self._token_heads = [head + b"%d" % i + text_key for i in range(n)]
        self._token_tail = (b"}" if kind == CHAT else b"") + b',"logprobs":null,"finish_reason":null}]}\n\n'

    def token_chunk(self, event: bytes, index: int = 0) -> bytes:
        """A protocol token event (its prefix, the text literal, ``,"index":N}``) as one SSE chunk."""
        if self.logprobs:
            return self._token_chunk_with_logprobs(p.decode(event), index)
        return self._token_heads[index] + token_literal(event, len(self.event_prefix)) + self._token_tail

    def stream_error(self, error: ApiError) -> bytes:
        return sse_error(error)

    def error_body(self, error: ApiError) -> dict[str, Any]:
        return error.body()

    def _token_chunk_with_logprobs(self, event: dict[str, Any], index: int) -> bytes:
        text, entries = event["text"], event.get("logprobs") or []
        if self.kind == CHAT:
            choice = {"index": index, "delta": {"content": text}, "logprobs": {"content": entries}}
        else:
            choice = {"index": index, "text": text, "logprobs": self._legacy(entries, index)}
        return _sse(self._chunk([{**choice, "finish_reason": None}]))

    def _legacy(self, entries: list[dict[str, Any]], index: int) -> dict[str, Any]:
        """Completions' logprobs: the tokens, their logprobs, {token: logprob} of the alternatives, and where
        each token's text begins in the choice's text (counted from the tokens' own text)."""
        offsets = []
        for entry in entries:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(entry["token"])
        return {
            "tokens": [entry["token"] for entry in entries],
            "token_logprobs": [entry["logprob"] for entry in entries],
            "top_logprobs": [{top["token"]: top["logprob"] for top in entry["top_logprobs"]} for entry in entries],
            "text_offset": offsets,
        }

    def opening(self) -> bytes:
        """Before the first token: chat streams name the role first, as OpenAI's do (once per choice)."""
        if self.kind != CHAT:
            return b""
        return b"".join(
            _sse(
                self._chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
            for i in range(self.n)
        )

    def choice_end(self, done: dict[str, Any], index: int) -> bytes:
        """After a choice's last token: its tool calls (whole, one delta for all), its finish reason."""
        reason = done.get("finish_reason")
        choice: dict[str, Any] = {"index": index, "delta": {}} if self.kind == CHAT else {"index": index, "text": ""}
        parts = []
        if done.get("tool_calls"):
            calls = [{"index": i, **call} for i, call in enumerate(openai_tool_calls(done["tool_calls"]))]
            delta = {"index": index, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}
            parts.append(_sse(self._chunk([delta])))
        parts.append(_sse(self._chunk([{**choice, "logprobs": None, "finish_reason": reason}])))
        return b"".join(parts)

    def closing(self, dones: list[dict[str, Any]]) -> bytes:
        """After every choice's end: the usage when asked for, ``[DONE]``."""
        parts = []
        if self.include_usage:
            parts.append(_sse({**self._chunk([]), "usage": usage(dones)}))
        parts.append(DONE)
        return b"".join(parts)

    def whole(self, dones: list[dict[str, Any]]) -> dict[str, Any]:
        """The answer of a request that did not stream: the protocol's done events (one per choice, in order)."""
        return {
            "id": self.request_id,
            "object": self._object,
            "created": self.created,
            "model": self.model,
            "choices": [self._whole_choice(done, index) for index, done in enumerate(dones)],
            "usage": usage(dones),
        }

    def _whole_choice(self, done: dict[str, Any], index: int) -> dict[str, Any]:
        text, reason = done.get("text", ""), done.get("finish_reason")
        logprobs: dict[str, Any] | None = None
        if self.logprobs:
            entries = done.get("logprobs") or []
            logprobs = {"content": entries} if self.kind == CHAT else self._legacy(entries, index)
        if self.kind == CHAT:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if done.get("tool_calls"):
                message = {
                    "role": "assistant",
                    "content": text or None,
                    "tool_calls": openai_tool_calls(done["tool_calls"]),
                }
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

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


def usage(dones: list[dict[str, Any]]) -> dict[str, int]:
    """OpenAI's usage from the done events' (a count the daemon could not know is 0): the prompt counted
    once, as OpenAI counts it for n choices, the completion tokens of every choice."""
    counts = [done.get("usage") or {} for done in dones]
    prompt = max((c.get("prompt_tokens") or 0 for c in counts), default=0)
    completion = sum(c.get("completion_tokens") or 0 for c in counts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
