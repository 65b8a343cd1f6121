"""The client socket: frames in, validated ops to the router, events out.

Each op has one handler in :attr:`ClientFront.ops`; adding an op is one
validator in core/validate.py, one handler here and its section in
docs/PROTOCOL.md.  Nothing a client sends can raise past this module: bad
input gets an error event with a specific code, a bug gets
``internal_error`` and a log line.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import zmq

from workers import protocol as p
from workers.protocol import ErrorCode

from .. import __version__
from ..core.router import Router
from ..core.errors import ClientError, Refused
from ..core.validate import (
    check_bare,
    message_id,
    message_op,
    parse_cancel,
    parse_embed,
    parse_generate,
    parse_load,
    parse_unload,
)
from ..logs import get_logger
from .memory import trim_soon
from .transport import SocketReader, send_now

log = get_logger("supervisor.client_front")

Handler = Callable[[list[bytes], str, dict[str, Any], float], None]


class LocalEnvelope(list):  # type: ignore[type-arg]
    """The envelope of a client inside this process (the HTTP front): one routing
    frame that no ZeroMQ peer is given, and ``deliver``, which takes the events
    the socket would have carried (False: the client counts as gone)."""

    __slots__ = ("deliver",)

    def __init__(self, routing_id: bytes, deliver: Callable[[bytes], bool]) -> None:
        super().__init__([routing_id])
        self.deliver = deliver


class ClientFront:
    def __init__(
        self,
        sock: zmq.Socket,
        router: Router,
        status: Callable[[], dict[str, Any]],
        reload: Callable[[str], dict[str, Any]],
        max_message_bytes: int,
        max_tokens_limit: int,
        models: Callable[[], dict[str, Any]] = lambda: {},
    ) -> None:
        self.sock = sock
        self.router = router
        self.status = status
        self.reload = reload  # the reply's fields; raises Refused(invalid_config) for a bad file
        self.max_message_bytes = max_message_bytes
        self.max_tokens_limit = max_tokens_limit
        self.models = models  # the ps op's answer: every model, available or loaded, and the unavailable files
        self.reader = SocketReader(sock, self.on_frames)
        self.ops: dict[str, Handler] = {
            p.OP_GENERATE: self._generate,
            p.OP_CANCEL: self._cancel,
            p.OP_STATUS: self._status,
            p.OP_PING: self._ping,
            p.OP_RELOAD: self._reload,
            p.OP_LOAD: self._load,
            p.OP_UNLOAD: self._unload,
            p.OP_PS: self._ps,
            p.OP_EMBED: self._embed,
        }

    def send(self, envelope: list[bytes], frame: bytes) -> bool:
        """One event to a client; False when it is gone (ROUTER_MANDATORY) or too far behind (SNDHWM)."""
        if envelope.__class__ is LocalEnvelope:  # the one check the ZeroMQ path pays for in-process clients
            return envelope.deliver(frame)  # type: ignore[attr-defined]
        # An error means the client went away (or fell SNDHWM events behind); the router logs what that ends.
        return send_now(self.sock, [*envelope, frame], self.reader) is None

    def on_frames(self, frames: list[bytes]) -> None:
        self.on_message(frames[:-1], frames[-1])

    def on_message(self, envelope: list[bytes], payload: bytes) -> None:
        """One client message: from the socket, or from an in-process client with a LocalEnvelope."""
        try:
            self._on_message(envelope, payload, time.monotonic())
        except Exception:  # a bug must not take the daemon down
            log.exception("internal error handling a client message")
            self._error(envelope, None, ErrorCode.INTERNAL, "internal error; see the daemon log")

    def _on_message(self, envelope: list[bytes], payload: bytes, now: float) -> None:
        trim_soon(len(payload))  # a large frame's memory goes back to the system once the burst is over
        if len(payload) > self.max_message_bytes:
            self._error(
                envelope,
                None,
                ErrorCode.TOO_LARGE,
                f"message is {len(payload)} bytes; the limit is {self.max_message_bytes}",
            )
            return
        try:
            message = p.decode(payload)
        except p.DecodeError as exc:
            self._error(envelope, None, ErrorCode.MALFORMED, str(exc))
            return
        mid = None
        try:
            mid = message_id(message)
            handler = self.ops[message_op(message)]
            if self.router.in_use(envelope, mid):
                raise Refused(ErrorCode.DUPLICATE_ID, f"id {mid!r} is still in use by a running request")
            handler(envelope, mid, message, now)
        except ClientError as exc:
            if exc.code == ErrorCode.DUPLICATE_ID:
                # Answering with this id would look like a second end of the running request.
                self._error(envelope, None, exc.code, exc.message, rejected_id=mid)
            else:
                self._error(envelope, mid, exc.code, exc.message)

    def _generate(self, envelope: list[bytes], mid: str, message: dict[str, Any], now: float) -> None:
        self.router.submit(envelope, mid, parse_generate(message, self.max_tokens_limit), now)

    def _embed(self, envelope: list[bytes], mid: str, message: dict[str, Any], now: float) -> None:
        self.router.submit(envelope, mid, parse_embed(message), now)

    def _cancel(self, envelope: list[bytes], mid: str, message: dict[str, Any], now: float) -> None:
        target = parse_cancel(message)
        found = self.router.in_use(envelope, target)
        # The ack goes first: a queued request's "cancelled" end follows it at once.
        self._reply(envelope, {"id": mid, "event": p.EVENT_CANCEL_ACK, "target": target, "found": found})
        if found:
            self.router.cancel(envelope, target, now)

    def _status(self, envelope: list[bytes], mid: str, message: dict[str, Any], now: float) -> None:
        check_bare(message)
        self._reply(envelope, {"id": mid, "event": p.EVENT_STATUS, **self.status()})

    def _ping(self, envelope: list[bytes], mid: str, message: dict[str, Any], now: float) -> None:
        check_bare(message)
        self._reply(
            envelope,
            {
                "id": mid,
                "event": p.EVENT_PONG,
                "protocol": p.PROTOCOL_VERSION,
                "version": __version__,
                "phase": self.router.engines.phase(),
            },
        )

    def _reload(self, envelope: list[bytes], mid: str, message: dict[str, Any], now: float) -> None:
        check_bare(message)
        self._reply(envelope, {"id": mid, "event": p.EVENT_RELOADED, **self.reload("reload op")})

    def _load(self, envelope: list[bytes], mid: str, message: dict[str, Any], now: float) -> None:
        name, keep_alive = parse_load(message)
        engines = self.router.engines
        engine = engines.get(name)
        if engine is None:
            raise Refused(
                ErrorCode.UNKNOWN_ENGINE, f"no engine named {name!r}; configured: {', '.join(engines.by_name)}"
            )
        if engine.refusal:
            raise Refused(*engine.refusal)
        if engines.stopping:
            raise Refused(ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
        state = engines.request_load(engine, keep_alive, now)
        event = {"id": mid, "event": p.EVENT_LOAD_ACK, "engine": name, "state": state}
        self._reply(
            envelope, {**event, "keep_alive_s": engine.residency.keep_alive_s, "waiting": engine.residency.waiting}
        )

    def _unload(self, envelope: list[bytes], mid: str, message: dict[str, Any], now: float) -> None:
        name = parse_unload(message)
        engines = self.router.engines
        if name is not None and engines.get(name) is None:
            raise Refused(
                ErrorCode.UNKNOWN_ENGINE, f"no engine named {name!r}; configured: {', '.join(engines.by_name)}"
            )
        targets = [engines[name]] if name is not None else [e for e in engines if e.worker.alive]
        answers = []
        for engine in targets:
            engines.request_unload(engine, now)
            pending = engine.residency.unload_reason is not None  # its requests finish first
            answers.append({"engine": engine.name, "state": engine.worker.state.value, "pending": pending})
        self._reply(envelope, {"id": mid, "event": p.EVENT_UNLOAD_ACK, "engines": answers})

    def _ps(self, envelope: list[bytes], mid: str, message: dict[str, Any], now: float) -> None:
        check_bare(message)
        self._reply(envelope, {"id": mid, "event": p.EVENT_PS, **self.models()})

    def _error(self, envelope: list[bytes], mid: str | None, code: str, message: str, **extra: Any) -> None:
        self._reply(envelope, {"id": mid, "event": p.EVENT_ERROR, "code": code, "message": message, **extra})

    def _reply(self, envelope: list[bytes], event: dict[str, Any]) -> None:
        if not self.send(envelope, p.encode(event)):
            self.router.client_gone(b"".join(envelope), time.monotonic())
