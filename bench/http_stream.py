"""Streamed completions over HTTP, timed from the client: llama-server's native endpoint and the daemon's HTTP front.

Both answer with Server-Sent Events, one ``data: {json}`` line per chunk,
read here with the standard library (``http.client``) and timed from the
call, as the other paths are: TTFT at the first chunk with text, the total
at the end of the stream.  Every request opens its own connection:
llama-server closes it after a streamed answer (whatever its Keep-Alive
header says), and both HTTP paths are measured alike, so connecting (about
0.1 ms on loopback) is part of each.

* llama-server: ``POST /completion`` with ``stream: true``; the last chunk
  has ``"stop": true`` and the server's own counts (``tokens_predicted``,
  ``timings``).  ``cache_prompt: false``: no prompt cache skews its figures.
* the HTTP front: ``POST /v1/completions`` (OpenAI's), the engine named as
  ``model``, ``stream_options.include_usage`` for the token count, ending
  with ``data: [DONE]``.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any, Callable, Iterable, Iterator

from bench.common import SEED


class StreamError(Exception):
    """The server answered something other than a streamed completion."""


def parse_sse(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an SSE stream's ``data:`` lines (blank lines, comments and other fields skipped).

    An ``error`` payload raises StreamError; the stream ends at ``[DONE]`` or at a chunk with ``"stop": true``.
    """
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line.startswith("data:"):
            continue  # event separator, ": comment", "event:", "id:", "retry:"
        data = line[5:].lstrip(" ")
        if data == "[DONE]":
            return
        payload = json.loads(data)
        if "error" in payload:
            raise StreamError(f"server error: {payload['error']}")
        yield payload
        if payload.get("stop"):
            return


def timed_stream(port: int, path: str, body: dict[str, Any], text_of: Callable[[dict], str]) -> tuple[dict, list[dict]]:
    """POST ``body`` and read the stream: (the run without its token count, every chunk)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise StreamError(f"{path} answered {response.status}: {response.read()[:500]!r}")
        first = None
        pieces: list[str] = []
        chunks = []
        for chunk in parse_sse(iter(response.readline, b"")):
            chunks.append(chunk)
            text = text_of(chunk)
            if text:
                if first is None:
                    first = time.perf_counter() - started
                pieces.append(text)
    finally:
        connection.close()
    return {"text": "".join(pieces), "ttft_s": first, "total_s": time.perf_counter() - started}, chunks


class LlamaServerClient:
    """llama-server's native /completion, as the other paths' generate request (greedy, fixed seed)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def run(self, prompt: str, max_tokens: int, ignore_eos: bool = True) -> dict:
        body = {
            "prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "seed": SEED,
            "stream": True, "cache_prompt": False, "ignore_eos": ignore_eos,
        }  # fmt: skip
        run, chunks = timed_stream(self.port, "/completion", body, lambda chunk: chunk.get("content") or "")
        final = next((chunk for chunk in chunks if chunk.get("stop")), None)
        if final is None:
            raise StreamError("llama-server's stream ended without its final chunk")
        return {**run, "tokens": final["tokens_predicted"], "server_timings": final.get("timings")}


class FrontClient:
    """The daemon's HTTP front, /v1/completions, pinned to one engine."""

    def __init__(self, port: int, engine: str) -> None:
        self.port, self.engine = port, engine

    def run(self, prompt: str, max_tokens: int, ignore_eos: bool = True) -> dict:
        body = {
            "model": self.engine, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": SEED,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos,
        }  # fmt: skip
        run, chunks = timed_stream(self.port, "/v1/completions", body, lambda chunk: "".join(c.get("text") or "" for c in chunk.get("choices") or ()))
        usage = next((chunk["usage"] for chunk in chunks if chunk.get("usage")), None)
        if usage is None:
            raise StreamError("the HTTP front's stream ended without its usage chunk")
        return {**run, "tokens": usage["completion_tokens"]}
