"""One HTTP request's conversation with the client front, and its answer.

Each HTTP request is a client of its own: a :class:`LocalEnvelope` whose
events the client front hands to :meth:`Exchange.deliver` instead of the
ZeroMQ socket.  So validation, queueing, deadlines, cancels and the one
terminal path are the ZeroMQ clients' own.  The answer waits for events
and writes them; a client that disconnects (the ASGI ``http.disconnect``
message, watched for the whole answer) gets its request cancelled with a
cancel op, as a ZeroMQ client would cancel it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from workers import protocol as p

from ..client_front import ClientFront, LocalEnvelope
from .answers import StreamAnswer
from .openai import ApiError, error_from_event

# Events waiting for a reader that does not keep up: beyond this the client counts as gone (as SNDHWM for ZeroMQ clients).
BACKLOG_LIMIT = 100_000
JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientGone(Exception):
    """The client went away before its request was whole: nothing to answer, nothing to log above debug."""


def json_body(payload: dict[str, Any]) -> bytes:
    return p.encode(payload)


class Exchange:
    """The events of one HTTP request, from the client front to its answer."""

    def __init__(self, front: ClientFront, routing_id: bytes, request_ids: list[str]) -> None:
        """``request_ids``: its generate ops (one per choice), all on this one envelope."""
        self.front = front
        self.running = dict.fromkeys(request_ids)  # the ops whose terminal event has not been read, in order
        self.envelope = LocalEnvelope(routing_id, self.deliver)
        self.events: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.gone = False  # the HTTP client disconnected, or fell too far behind
        self.failed = False  # an op ended in an error: the answer is that error, the other ops are cancelled
        self._closed = False  # nobody reads any more: events are dropped

    @property
    def ended(self) -> bool:
        """Nothing more to read: every op's terminal event is in, or one was an error."""
        return self.failed or not self.running

    def terminal(self, request_id: str, failed: bool = False) -> None:
        """An op's terminal event has been read."""
        self.running.pop(request_id, None)
        self.failed = self.failed or failed

    def send(self, message: dict[str, Any]) -> None:
        """A client message, handled now (the client front never raises)."""
        self.front.on_message(self.envelope, p.encode(message))

    def deliver(self, frame: bytes) -> bool:
        """The client front's send for this request (on the loop, never blocking)."""
        if self._closed:
            return True
        self.events.append(frame)
        if len(self.events) > BACKLOG_LIMIT:
            self.disconnected()
            return False  # the router ends the request as cancelled
        self._wake()
        return True

    def disconnected(self) -> None:
        self.gone = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def take(self) -> list[bytes]:
        """Every event arrived since the last take, waiting for one; [] once the client is gone."""
        while not self.events and not self.gone:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self.gone:
            return []
        frames = list(self.events)
        self.events.clear()
        return frames

    def close(self) -> None:
        """The answer is over: a request still running is cancelled, so it ends "cancelled" and its worker stops."""
        self._closed = True
        for request_id in self.running:
            self.send({"op": p.OP_CANCEL, "id": "cancel", "target": request_id})


class GenerationAnswer:
    """The ASGI answer of a completion request: a stream (OpenAI's server-sent events, Ollama's NDJSON: the
    ``answer`` writes its chunks), or one JSON body.

    The status line waits for the first event, so an error that comes before
    any token (a full queue, a deadline, the daemon stopping) is an HTTP
    error; one after tokens is the stream's last chunk.
    """

    def __init__(self, exchange: Exchange, answer: StreamAnswer, stream: bool, renamed: dict[str, str]) -> None:
        self.exchange, self.answer, self.stream, self.renamed = exchange, answer, stream, renamed
        self.dones: dict[str, dict[str, Any]] = {}  # each op's done event, by its id

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watcher = asyncio.ensure_future(watch_disconnect(receive, self.exchange))
        try:
            await (self._stream(send) if self.stream else self._whole(send))
        finally:
            watcher.cancel()
            self.exchange.close()

    async def _stream(self, send: Any) -> None:
        exchange, started = self.exchange, False
        while not exchange.ended:
            frames = await exchange.take()
            if not frames:
                return  # the client went away: close() cancels the request
            chunks, error = self._chunks(frames)
            if error is not None and not started and not chunks:
                await send_json(send, error.status, self.answer.error_body(error))
                return
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": self.answer.stream_headers})
                started = True
                chunks.insert(0, self.answer.opening())
            if error is not None:
                chunks.append(self.answer.stream_error(error))
            await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": not exchange.ended})

    def _chunks(self, frames: list[bytes]) -> tuple[list[bytes], ApiError | None]:
        """The SSE chunks of these events, and the error that ended the request if one did."""
        chunks, answer, exchange = [], self.answer, self.exchange
        prefix, choice_of = answer.event_prefix, answer.choice_of
        for frame in frames:
            if answer.n == 1:
                if frame.startswith(prefix):
                    chunks.append(answer.token_chunk(frame))
                    continue
            elif (index := choice_of.get(frame[: len(prefix)])) is not None:
                chunks.append(answer.token_chunk(frame, index))
                continue
            event = p.decode(frame)
            if event.get("event") == p.EVENT_DONE:
                exchange.terminal(event.get("id", ""))
                self.dones[event.get("id", "")] = event
                chunks.append(answer.choice_end(event, answer.index_of.get(event.get("id", ""), 0)))
                if exchange.ended:
                    chunks.append(answer.closing(list(self.dones.values())))
                    break
            elif event.get("event") == p.EVENT_ERROR:
                exchange.terminal(event.get("id", ""), failed=True)
                return chunks, error_from_event(event, self.renamed)
        return chunks, None

    async def _whole(self, send: Any) -> None:
        exchange = self.exchange
        while not exchange.ended:
            frames = await exchange.take()
            if not frames:
                return
            for event in map(p.decode, frames):
                if event.get("event") == p.EVENT_DONE:
                    exchange.terminal(event.get("id", ""))
                    self.dones[event.get("id", "")] = event
                    if exchange.ended:
                        dones = [self.dones[op_id] for op_id in self.answer.op_ids]
                        await send_json(send, 200, self.answer.whole(dones))
                        return
                elif event.get("event") == p.EVENT_ERROR:
                    exchange.terminal(event.get("id", ""), failed=True)
                    error = error_from_event(event, self.renamed)
                    await send_json(send, error.status, self.answer.error_body(error))
                    return


async def watch_disconnect(receive: Any, exchange: Exchange) -> None:
    """The request body has been read: the next message ASGI has for us is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass
    exchange.disconnected()


async def send_json(
    send: Any, status: int, payload: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json_body(payload)
    start_headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
