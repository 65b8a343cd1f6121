"""The HTTP front's door: how many connections, from whom, and for how long (docs/HTTP.md, "Limits").

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) and
nothing else a client controls: a connection that never finishes its
headers or its body is held for ever, and ``limit_concurrency`` answers in
plain text, after the headers, without ``Retry-After``.  :class:`DoorProtocol`
is uvicorn's own httptools protocol with:

- a deadline for the request line and headers (from the connection's start,
  or from the first byte of a later request on a kept-alive connection), and
  one for the body (from the end of the headers); past it the connection is
  closed, and an application still reading the body sees a disconnect;
- a bound on the request line and headers' size (431 beyond ``MAX_HEAD_BYTES``);
- a lingering close: an answer that closes the connection before the request's
  body was read (413, 503) is followed by a half-close, and what the client
  still sends is dropped unread for a moment, so that a client still sending
  reads the answer instead of a reset;
- admission: beyond ``max_connections``, or beyond ``max_connections_per_client``
  from one address, the request is answered ``503`` with ``Retry-After`` in
  OpenAI's error shape and the connection closed.

And :class:`DoorSocket`, the listening socket, keeps the descriptor budget
(``RLIMIT_NOFILE``'s soft limit less ``fd_reserve``) where connections are
accepted: asyncio accepts every connection waiting before any protocol sees
one, so a check there would come too late.  Beyond the budget, or beyond
twice ``max_connections`` (those past ``max_connections`` are held only until
their 503), a connection is closed as soon as it is accepted, unread: the
front never holds more than that, and ZeroMQ, the logs and worker restarts
always find descriptors.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ...logs import get_logger
from .exchange import send_json
from .openai import ApiError

log = get_logger("supervisor.http")

RETRY_AFTER_S = 1
LINGER_S = 2.0  # a connection closed with its request body unread: what still comes is dropped this long, then close
LINGER_BYTES = 1 << 20  # or until this much was dropped
MAX_HEAD_BYTES = 64 << 10  # a request line and headers larger than this: 431 (httptools itself sets no bound)
TOO_MANY_CONNECTIONS = "too_many_connections"


@dataclass(frozen=True)
class DoorLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    max_connections_per_client: int
    budget: int | None  # descriptors the front may hold at once; None: no limit known


def descriptor_budget(reserve: int) -> int | None:
    """RLIMIT_NOFILE's soft limit less ``reserve``: what HTTP connections may use (None where unlimited or unknown)."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - reserve, 0)


class Door:
    """The connections open now (all of them, and by client address) and what the door did, for metrics."""

    def __init__(self, limits: DoorLimits) -> None:
        self.limits = limits
        self.open = 0
        self.by_client: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()  # refused_busy, refused_client, closed_budget, header_timeout, ...

    def accepted(self) -> bool:
        """A connection just accepted: counted (True), or to be closed at once (False): past the descriptor
        budget, or past twice ``max_connections`` (those beyond ``max_connections`` wait for their 503)."""
        if self.limits.budget is not None and self.open >= self.limits.budget:
            self.counts["closed_budget"] += 1
            return False
        if self.open >= 2 * self.limits.max_connections:
            self.counts["closed_overflow"] += 1
            return False
        self.open += 1
        return True

    def verdict(self, client: str) -> str | None:
        """For an accepted connection (counted in ``open``): None, served; "busy" or "client_busy", answered 503."""
        limits = self.limits
        if self.open > limits.max_connections:
            return "busy"
        if self.by_client[client] >= limits.max_connections_per_client:
            return "client_busy"
        return None

    def enter(self, client: str) -> None:
        self.by_client[client] += 1

    def leave(self, client: str) -> None:
        self.open -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]

    def protocol(self) -> type[DoorProtocol]:
        """The protocol class uvicorn builds for each connection, bound to this door."""
        return type("BoundDoorProtocol", (DoorProtocol,), {"door": self})


class DoorCollector(Collector):
    """The door's figures for /metrics (docs/METRICS.md): connections open, refused, timed out, clients gone early."""

    REFUSALS = ("busy", "client_busy", "overflow", "budget", "head_too_large")
    TIMEOUTS = ("header_timeout", "body_timeout")

    def __init__(self, door: Door, gone_early: Any) -> None:
        self.door, self.gone_early = door, gone_early

    def collect(self) -> Any:
        counts = self.door.counts
        yield GaugeMetricFamily("node_supervisor_http_connections_open", "open HTTP connections", self.door.open)
        refused = CounterMetricFamily(
            "node_supervisor_http_connections_refused",
            "HTTP connections beyond a limit: busy and client_busy answered 503, overflow and budget closed unread,"
            " head_too_large answered 431",
            labels=["reason"],
        )
        for reason in self.REFUSALS:
            key = {"budget": "closed_budget", "overflow": "closed_overflow", "head_too_large": "head_too_large"}.get(
                reason, f"refused_{reason}"
            )
            refused.add_metric([reason], counts[key])
        yield refused
        timeouts = CounterMetricFamily(
            "node_supervisor_http_timeouts",
            "HTTP connections closed at their header or body deadline",
            labels=["phase"],
        )
        for what in self.TIMEOUTS:
            timeouts.add_metric([what.split("_")[0]], counts[what])
        yield timeouts
        yield CounterMetricFamily(
            "node_supervisor_http_client_gone_early",
            "HTTP clients that went away before their request was read whole",
            self.gone_early(),
        )


def refusal(reason: str) -> Any:
    """The ASGI answer to a connection beyond a limit: 503, Retry-After, OpenAI's shape, then close."""
    message = (
        "too many connections from this address; retry later"
        if reason == "client_busy"
        else "too many connections; retry later"
    )
    body = ApiError(503, message, TOO_MANY_CONNECTIONS).body()
    headers = [(b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send_json(send, 503, body, headers)

    return app


class DoorSocket(socket.socket):
    """The listening socket: connections past the door's descriptor budget are closed as they are accepted."""

    door: Door | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        while True:
            conn, address = super().accept()  # BlockingIOError once none waits: asyncio's loop stops there
            if self.door is None or self.door.accepted():
                return conn, address
            conn.close()


class LingeringTransport:
    """The connection's transport as uvicorn sees it: a close before the request's body is all in lingers."""

    def __init__(self, transport: asyncio.Transport, protocol: DoorProtocol) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        cycle, transport = self._protocol.cycle, self._transport
        lingers = cycle is not None and cycle.more_body and cycle.response_complete
        if lingers and not transport.is_closing() and transport.can_write_eof():
            self._protocol.linger()
        else:
            self._transport.close()


class DoorProtocol(HttpToolsProtocol):
    door: Door

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._admitted: str | None = None  # the client address counted in the door
        self._head_bytes: int | None = None  # bytes of the request head under way (None: none is)
        self._dropping: int | None = None  # lingering: bytes dropped so far
        self._heads = 0  # request heads complete on this connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._raw = transport
        self.transport = LingeringTransport(transport, self)  # type: ignore[assignment]
        door = self.door
        client = self.client[0] if self.client else ""
        verdict = door.verdict(client)
        door.enter(client)
        self._admitted = client
        if verdict is not None:
            door.counts[f"refused_{verdict}"] += 1
            self.app = refusal(verdict)  # this connection's only request gets it; the answer closes the connection
        self._arm(door.limits.header_timeout_s, "header_timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self._admitted is not None:
            self.door.leave(self._admitted)
            self._admitted = None
        super().connection_lost(exc)

    def linger(self) -> None:
        """The answer is written: half-close, drop what the client still sends, close after LINGER_S."""
        if self._dropping is not None:
            return
        self._dropping = 0
        self._raw.write_eof()
        self.flow.resume_reading()
        self._cancel()
        self._timer = self.loop.call_later(LINGER_S, self._raw.close)

    def data_received(self, data: bytes) -> None:
        if self._dropping is not None:
            self._dropping += len(data)
            if self._dropping > LINGER_BYTES:
                self._raw.close()
            return
        heads, in_head = self._heads, self._head_bytes is not None
        super().data_received(data)
        if in_head and self._head_bytes is not None and self._heads == heads:  # a head began before and goes on
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self._raw.is_closing():
                self.door.counts["head_too_large"] += 1
                body = json.dumps(
                    ApiError(431, f"the request line and headers are over {MAX_HEAD_BYTES} bytes", None).body()
                ).encode()
                self._raw.write(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                )
                self.linger()

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()
        if self._timer is None:  # a later request on a kept-alive connection: its headers' time starts now
            self._arm(self.door.limits.header_timeout_s, "header_timeout")

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._heads += 1
        self._cancel()
        super().on_headers_complete()
        self._arm(self.door.limits.body_timeout_s, "body_timeout")

    def on_message_complete(self) -> None:
        self._cancel()
        super().on_message_complete()

    def _arm(self, seconds: float, what: str) -> None:
        self._cancel()
        self._timer = self.loop.call_later(seconds, self._expired, what)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, what: str) -> None:
        """Headers or body not in by their deadline: the connection is closed (a reader of the body sees a disconnect)."""
        self._timer = None
        self.door.counts[what] += 1
        log.debug("http connection closed", reason=what, client=self._admitted)
        if not self._raw.is_closing():
            self._raw.close()
