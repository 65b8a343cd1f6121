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
* OpenAI's ``POST /v1/completions`` (OpenAICompletions), ending with
  ``data: [DONE]``: the daemon's HTTP front (FrontClient: the engine named as
  ``model``, ``ignore_eos``, ``stream_options.include_usage`` for the token
  count) and llama-cpp-python's own server (bench/llama_cpp_python_server.py:
  it takes neither, so the count comes from the finish, see
  ``length_finish_tokens``).
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
            "prompt": prompt,
            "n_predict": max_tokens,
            "temperature": 0.0,
            "seed": SEED,
            "stream": True,
            "cache_prompt": False,
            "ignore_eos": ignore_eos,
        }
        run, chunks = timed_stream(self.port, "/completion", body, lambda chunk: chunk.get("content") or "")
        final = next((chunk for chunk in chunks if chunk.get("stop")), None)
        if final is None:
            raise StreamError("llama-server's stream ended without its final chunk")
        return {**run, "tokens": final["tokens_predicted"], "server_timings": final.get("timings")}


def usage_tokens(chunks: list[dict], max_tokens: int) -> int:
    """The count the server reports in its usage chunk (``stream_options.include_usage``)."""
    usage = next((chunk["usage"] for chunk in chunks if chunk.get("usage")), None)
    if usage is None:
        raise StreamError("the stream ended without its usage chunk")
    return usage["completion_tokens"]


def length_finish_tokens(chunks: list[dict], max_tokens: int) -> int:
    """``max_tokens``, when the stream finished for its length; else StreamError.

    For a server whose stream carries no usage and whose chunks may hold more
    than one token (llama-cpp-python's holds back incomplete UTF-8): its loop
    adds one token a step and finishes with "length" once it has
    ``max_tokens``, so that finish means exactly ``max_tokens`` tokens.  Any
    other ("stop": an end-of-generation token came first) leaves the count
    unknown, and the run is refused rather than counted wrong.
    """
    finishes = [
        choice.get("finish_reason")
        for chunk in chunks
        for choice in chunk.get("choices") or ()
        if choice.get("finish_reason")
    ]
    if finishes != ["length"]:
        raise StreamError(
            f"the stream finished with {finishes or 'no finish_reason'}, not once for its length: fewer than {max_tokens} tokens (an end of generation came first)"
        )
    return max_tokens


class OpenAICompletions:
    """OpenAI's streamed /v1/completions as the other paths' generate request (greedy, fixed seed).

    ``extra``: what this server needs besides OpenAI's fields; ``count(chunks, max_tokens)``: the tokens generated.
    """

    def __init__(self, port: int, model: str, extra: dict[str, Any], count: Callable[[list[dict], int], int]) -> None:
        self.port, self.model, self.extra, self.count = port, model, extra, count

    def run(self, prompt: str, max_tokens: int) -> dict:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": SEED,
            "stream": True,
            **self.extra,
        }
        run, chunks = timed_stream(
            self.port,
            "/v1/completions",
            body,
            lambda chunk: "".join(c.get("text") or "" for c in chunk.get("choices") or ()),
        )
        return {**run, "tokens": self.count(chunks, max_tokens)}


class FrontClient(OpenAICompletions):
    """The daemon's HTTP front, pinned to one engine: ``ignore_eos``, and the count from its usage chunk."""

    def __init__(self, port: int, engine: str, ignore_eos: bool = True) -> None:
        super().__init__(
            port, engine, {"stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}, usage_tokens
        )
