"""The worker's side of the conversation with the daemon on its main socket.

One object owns that DEALER socket and what arrives on it: commands read
between two tokens wait in order (a load, generate requests), cancels and a
shutdown are noted at once.  It sends everything the worker says about its
requests (tokens, done, errors) and keeps the activity the watchdog thread
reports in heartbeats.  The one-at-a-time serving loop (runtime.py) and the
batch loop (batch.py) both talk through it, so neither reaches into the other.

Used by the main thread only: ZeroMQ sockets are not thread-safe.  The
watchdog thread reads ``activity`` (a dict it copies) and nothing else.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable

import zmq

from . import protocol as p
from .engine import GenerateResult
from .tool_emitter import ToolCallEmitter
from .protocol.messages import (
    DAEMON_MESSAGES,
    Cancel,
    Done,
    Embed,
    Generate,
    GenerateError,
    Load,
    Message,
    ProtocolError,
    Shutdown,
    Token,
    Usage,
    read_message,
)

log = logging.getLogger("worker")


class Conversation:
    def __init__(self, sock: zmq.Socket) -> None:
        self.socket = sock
        self.waiting: deque[Load | Generate | Embed] = deque()  # load, generate and embed commands, in order
        self.cancelled: set[str] = set()
        self.stopping = False  # the daemon asked for a shutdown
        # What heartbeats report; written by the main thread, read by the watchdog.
        self.activity: dict[str, Any] = {"phase": "starting", "request_id": None, "tokens": 0, "last_token_at": None}

    # --- what comes in ---------------------------------------------------------------

    def next_command(self) -> Load | Generate | Embed | None:
        """Wait for the next load, generate or embed; None once asked to shut down."""
        while not self.stopping:
            if self.waiting:
                return self.waiting.popleft()
            self._on_command(self.socket.recv())
        return None

    def read_commands(self) -> None:
        """Take in what the daemon sent meanwhile (a cancel, a shutdown) without waiting."""
        sock = self.socket
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._on_command(sock.recv(zmq.NOBLOCK))

    def put_back(self, message: Load | Generate | Embed) -> None:
        """A command taken by next_command that is to be served next after all."""
        self.waiting.appendleft(message)

    def _on_command(self, frame: bytes) -> None:
        try:
            message = read_message(DAEMON_MESSAGES, p.decode(frame))
        except (p.DecodeError, ProtocolError) as exc:
            log.error("invalid message from daemon: %s", exc)
            return
        if isinstance(message, Cancel):
            self.cancelled.add(message.request_id)
        elif isinstance(message, Shutdown):
            self.stopping = True
        elif isinstance(message, (Load, Generate, Embed)):
            self.waiting.append(message)

    def forget(self, request_id: str) -> None:
        """The request has ended: a cancel for it no longer matters."""
        self.cancelled.discard(request_id)

    # --- what goes out -----------------------------------------------------------------

    def send(self, message: Message) -> None:
        self.socket.send(p.encode(message.to_wire()))

    def send_frames(self, frames: list[bytes]) -> None:
        """Several token frames as one message: one send, one wake-up of the daemon."""
        self.socket.send_multipart(frames)

    def send_error(self, request_id: str, code: str, message: str) -> None:
        self.send(GenerateError(request_id=request_id, code=code, message=message))

    def send_done(self, request_id: str, result: GenerateResult, started: float, emit: Any) -> None:
        # A request with tools: its held text is parsed now (calls) or sent on as content (workers/tool_emitter.py).
        calls = emit.finish(result.finish_reason) if isinstance(emit, ToolCallEmitter) else None
        ended = time.monotonic()
        first_token_at = getattr(emit, "first_token_at", None) or ended
        self.send(
            Done(
                request_id=request_id,
                finish_reason=p.FINISH_TOOL_CALLS if calls else result.finish_reason,
                tool_calls=calls,
                usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
                timings={
                    "prefill_ms": round((first_token_at - started) * 1000, 3),
                    "generate_ms": round((ended - started) * 1000, 3),
                },
            )
        )

    def emitter(self, request_id: str, send: Callable[[bytes], Any] | None = None, logprobs: bool = False) -> Any:
        """The request's emit function: sends from this thread, no other thread wakes for a token.
        ``send``: where its frames go instead of the socket (the batch loop gathers a step's);
        ``logprobs``: the request asked for them (the engine passes each piece's entries)."""
        if logprobs:
            return self._emitter_with_logprobs(request_id, send)
        activity, send, encode_string = self.activity, send or self.socket.send, p.encode_string
        token_prefix = p.token_frame_prefix(request_id)

        def emit(text: str, tokens: int = 1) -> None:
            """The fast form (no JSON work here or in the daemon) for one token, ``"tokens": N`` for any other count."""
            now = time.monotonic()
            if emit.first_token_at is None:  # type: ignore[attr-defined]
                emit.first_token_at = now  # type: ignore[attr-defined]
            activity["tokens"] += tokens
            activity["last_token_at"] = now
            if tokens == 1:
                send(token_prefix + encode_string(text) + b"}")
            else:
                send(p.encode(Token(request_id=request_id, text=text, tokens=tokens).to_wire()))

        emit.first_token_at = None  # type: ignore[attr-defined]
        return emit

    def _emitter_with_logprobs(self, request_id: str, send: Callable[[bytes], Any] | None = None) -> Any:
        """The emit function of a request that asked for logprobs: every message in the general form, with the
        entries of the tokens its text holds (the engine passes them); kept apart so the fast form stays as it is."""
        activity, send = self.activity, send or self.socket.send

        def emit(text: str, tokens: int = 1, logprobs: Any = ()) -> None:
            now = time.monotonic()
            if emit.first_token_at is None:  # type: ignore[attr-defined]
                emit.first_token_at = now  # type: ignore[attr-defined]
            activity["tokens"] += tokens
            activity["last_token_at"] = now
            message = Token(request_id=request_id, text=text, tokens=tokens, logprobs=tuple(logprobs))
            send(p.encode(message.to_wire()))

        emit.first_token_at = None  # type: ignore[attr-defined]
        return emit
