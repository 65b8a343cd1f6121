"""The worker socket: who is speaking, what they said, and passing it on.

A worker is known by the routing id it was spawned with (its worker id and
a per-spawn secret); frames from any other peer are refused and logged,
never acted on.  Each worker message type has one handler in
:attr:`WorkerLink.handlers`.  Token messages in the exact form the worker
runtime writes take a fast path that forwards their text without JSON work.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import zmq

from workers import protocol as p
from workers.protocol.messages import (
    WORKER_MESSAGES,
    DaemonHeartbeat,
    Done,
    Embeddings,
    Failed,
    GenerateError,
    Heartbeat,
    Hello,
    LoadFailed,
    Loading,
    Message,
    ProtocolError,
    Ready,
    Shutdown,
    Token,
    read_message,
)

from ..core.engines import EngineState
from ..core.router import Router
from ..core.supervision import Supervision
from ..logs import get_logger
from .transport import SocketReader, send_now

log = get_logger("supervisor.worker_link")

Handler = Callable[[EngineState, Any, float], None]  # each takes its own message class
REFUSAL_LOG_INTERVAL_S = 10.0  # refused peers are logged at most this often (with a count)


class WorkerLink:
    def __init__(self, sock: zmq.Socket, supervisor: Supervision, router: Router, publish: Callable[..., None]) -> None:
        self.sock = sock
        self.supervisor = supervisor
        self.router = router
        self.publish = publish
        self.reader = SocketReader(sock, self.on_frames)
        self._peers: dict[
            bytes, tuple[str, EngineState]
        ] = {}  # routing id (main or watchdog socket) -> (worker id, engine)
        self._routes: dict[str, bytes] = {}  # worker id -> routing id of its main socket
        self._refused_since_log = 0
        self._refusal_logged_at = float("-inf")
        self.handlers: dict[type[Message], Handler] = {
            Hello: supervisor.on_hello,
            Loading: supervisor.on_loading,
            Ready: supervisor.on_ready,
            LoadFailed: supervisor.on_load_failed,
            Failed: supervisor.on_failed,
            Heartbeat: supervisor.on_heartbeat,
            Token: self._on_token,
            Done: router.on_result,
            Embeddings: router.on_result,
            GenerateError: router.on_result,
        }

    # --- who may speak ---------------------------------------------------------------

    def admit(self, worker_id: str, routing_id: bytes, engine: EngineState) -> None:
        """A worker of ``engine`` is being spawned with this routing id: its frames will be accepted."""
        self._routes[worker_id] = routing_id
        self._peers[routing_id] = self._peers[routing_id + p.WATCHDOG_SUFFIX.encode()] = (worker_id, engine)

    def forget(self, worker_id: str) -> None:
        routing_id = self._routes.pop(worker_id, None)
        if routing_id is not None:
            self._peers.pop(routing_id, None)
            self._peers.pop(routing_id + p.WATCHDOG_SUFFIX.encode(), None)

    def _refuse(self, routing_id: bytes, now: float) -> None:
        self._refused_since_log += 1
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL_S:
            shown = routing_id[:64].decode("utf-8", "replace")
            log.warning(
                "message from an unknown peer on the worker endpoint refused",
                routing_id=shown,
                refused=self._refused_since_log,
            )
            self.publish("worker.refused", routing_id=shown, refused=self._refused_since_log)
            self._refused_since_log, self._refusal_logged_at = 0, now

    # --- sending ---------------------------------------------------------------------

    def send(self, worker_id: str, message: Message) -> None:
        """To the worker's main socket; dropped if it is not connected (its exit is seen elsewhere)."""
        routing_id = self._routes.get(worker_id)
        if routing_id is not None:
            self._send(routing_id, p.encode(message.to_wire()))

    def send_heartbeat(self, worker_id: str) -> None:
        routing_id = self._routes.get(worker_id)
        if routing_id is not None:
            self._send(routing_id + p.WATCHDOG_SUFFIX.encode(), p.encode(DaemonHeartbeat().to_wire()))

    def _send(self, routing_id: bytes, frame: bytes) -> None:
        error = send_now(self.sock, [routing_id, frame], self.reader)
        if error is not None:
            log.debug("worker unreachable", error=str(error))

    # --- receiving --------------------------------------------------------------------

    def on_frames(self, frames: list[bytes]) -> None:
        now = time.monotonic()
        routing_id = frames[0]
        peer = self._peers.get(routing_id)
        if peer is None:
            self._refuse(routing_id, now)
            return
        worker_id, engine = peer
        if engine.worker.worker_id != worker_id:  # a worker of an earlier generation: it has no business here
            self._send(routing_id, p.encode(Shutdown().to_wire()))
            return
        # Usually one message per frame list; a worker serving several requests sends a step's tokens together.
        for payload in frames[1:]:
            if payload.startswith(p.TOKEN_FRAME_START) and self._fast_token(engine, payload, now):
                continue
            try:
                self._on_message(engine, payload, now)
            except Exception:  # a bug must not take the daemon down
                log.exception("internal error handling a worker message", worker_id=worker_id)

    def _fast_token(self, engine: EngineState, payload: bytes, now: float) -> bool:
        """A token of a running request in the runtime's own form; False: take the general path."""
        wire_id = p.token_frame_request_id(payload)
        generation = engine.worker.running.get(wire_id) if wire_id is not None else None
        prefix = generation.worker_token_prefix if generation is not None else b"-"
        if not (
            payload.startswith(prefix) and payload.endswith(b'"}') and payload[len(prefix) : len(prefix) + 1] == b'"'
        ):
            return False
        self.router.on_token(engine, wire_id, payload[len(prefix) : -1], 1, now)  # type: ignore[arg-type]
        return True

    def _on_message(self, engine: EngineState, payload: bytes, now: float) -> None:
        worker_id = engine.worker.worker_id
        try:
            raw = p.decode(payload)
        except p.DecodeError as exc:
            log.error("undecodable message from a worker", worker_id=worker_id, error=str(exc))
            return
        bad_text = p.invalid_text_path(raw)
        try:
            message = read_message(WORKER_MESSAGES, raw) if bad_text is None else None
        except ProtocolError as exc:
            message, bad_text = None, str(exc)
        if message is None:
            log.error("invalid message from a worker", worker_id=worker_id, type=repr(raw.get("type")), error=bad_text)
            return
        self.supervisor.heard_from(engine, now)
        self.handlers[type(message)](engine, message, now)

    def _on_token(self, engine: EngineState, message: Token, now: float) -> None:
        # 0: text held back from tokens already counted (a stop string that did not complete)
        count = message.tokens if message.tokens >= 0 else 1
        self.router.on_token(engine, message.request_id, p.encode_string(message.text), count, now, message.logprobs)
