"""OpenAI's ``POST /v1/embeddings`` in the protocol's terms: the body becomes an embed op, its
``embeddings`` event the answer.  docs/HTTP.md lists every field.

:func:`run_embed` runs one embed op through the client front (the same queue, routing and terminal path
as a ZeroMQ client's) and returns its terminal event: it is also what another HTTP API (Ollama's
``/api/embed``) calls to embed.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from dataclasses import dataclass
from typing import Any

from workers import protocol as p
from workers.protocol import ErrorCode

from ...config import EngineConfig
from ..client_front import ClientFront
from .exchange import ClientGone, Exchange, watch_disconnect
from .openai import DEFAULT_MODEL, ApiError, bad_request, error_from_event, resolve_model

FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})
ENCODINGS = ("float", "base64")


@dataclass
class EmbeddingsRequest:
    message: dict[str, Any]  # the embed op, without its id
    model: str  # what the answer's `model` says: the name asked for
    encoding_format: str
    dimensions: int | None


def parse_embeddings(body: dict[str, Any], engines: dict[str, EngineConfig]) -> EmbeddingsRequest:
    """An embeddings body as an embed op; ApiError for what is not OpenAI's shape (the protocol checks the
    input itself: empty, wrong types, too many, each error naming ``input`` or ``input[i]``)."""
    for key in body:
        if key not in FIELDS:
            raise bad_request(ascii(key)[1:-1], "unrecognized request argument")
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODINGS:
        raise bad_request("encoding_format", "must be float or base64")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise bad_request("dimensions", "must be a positive integer")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_request("user", "must be a string")
    if "input" not in body:
        raise bad_request("input", "missing: a string, an array of strings or an array of token arrays")
    value = body["input"]
    # One token array (OpenAI's "array of integers") is one input.
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    message: dict[str, Any] = {"op": p.OP_EMBED, "input": value}
    engine = resolve_model(body.get("model"), engines)
    if engine is not None:
        message["engine"] = engine
    return EmbeddingsRequest(message, body.get("model") or DEFAULT_MODEL, encoding, dimensions)


async def run_embed(
    front: ClientFront, routing_id: bytes, request_id: str, message: dict[str, Any], receive: Any = None
) -> dict[str, Any]:
    """Run one embed op (``message``: its fields, ``op`` and ``id`` set here) to its end; its terminal event:
    ``embeddings`` (``embeddings``: one vector per input, ``usage.prompt_tokens``), or ``error``.
    ``receive``: the HTTP request's ASGI receive, its body read: a client that disconnects meanwhile gets its
    embed cancelled (ClientGone), as a generation is."""
    exchange = Exchange(front, routing_id, [request_id])
    watcher = asyncio.ensure_future(watch_disconnect(receive, exchange)) if receive is not None else None
    try:
        exchange.send({**message, "op": p.OP_EMBED, "id": request_id})
        while True:
            frames = await exchange.take()
            if not frames:
                raise ClientGone()  # close() below cancels the embed
            for event in map(p.decode, frames):
                if event.get("event") in p.TERMINAL_EVENTS:
                    exchange.terminal(request_id)
                    if event["event"] == p.EVENT_DONE:  # cancelled (the daemon stopping)
                        return {
                            **event,
                            "event": p.EVENT_ERROR,
                            "code": ErrorCode.SHUTTING_DOWN,
                            "message": "cancelled",
                        }
                    return event
    finally:
        if watcher is not None:
            watcher.cancel()
        exchange.close()


def vectors_of(event: dict[str, Any], dimensions: int | None) -> list[list[float]]:
    """An embed op's vectors (OpenAI's answer and Ollama's both start here); ApiError for an error event, or
    ``dimensions`` the model's vectors do not have (the daemon never shortens them)."""
    if event.get("event") != p.EVENT_EMBEDDINGS:
        raise error_from_event(event, {})
    vectors = event["embeddings"]
    size = len(vectors[0]) if vectors else 0
    if dimensions is not None and dimensions != size:
        raise bad_request("dimensions", f"this model's embeddings have {size} dimensions; it cannot give {dimensions}")
    return vectors


def answer(request: EmbeddingsRequest, event: dict[str, Any]) -> dict[str, Any]:
    """The embeddings event as OpenAI's answer; ApiError for an error event or dimensions it cannot give."""
    vectors = vectors_of(event, request.dimensions)
    encode = _base64 if request.encoding_format == "base64" else list
    tokens = event.get("usage", {}).get("prompt_tokens", 0)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _base64(vector: list[float]) -> str:
    """As OpenAI encodes: the vector's little-endian float32 bytes, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


__all__ = ["ApiError", "EmbeddingsRequest", "answer", "parse_embeddings", "run_embed"]
