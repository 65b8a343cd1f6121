"""The client socket while the daemon starts: it answers before anything can serve.

The daemon binds its client socket first, then builds missing engine
environments and assembles the default model (minutes on a first start).
Meanwhile this front answers on that socket: ``ping`` and ``status`` with
the start-up phase and the last line of its progress, ``generate`` and
``reload`` with ``not_ready``, ``cancel`` with "not found".  Once the daemon
serves, its client front takes the same socket over (nothing is lost: a
message that arrived in between is read by the next reader).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from workers import protocol as p
from workers.protocol import ErrorCode

from .. import __version__
from ..core.errors import ClientError, Refused
from ..core.validate import check_bare, message_id, message_op, parse_cancel
from ..logs import get_logger
from .transport import SocketReader, send_now

log = get_logger("supervisor.startup_front")


@dataclass
class StartupProgress:
    """What the start-up is doing now; written by the preparing thread, read by the front (plain assignments)."""

    phase: str = "starting"
    detail: str = ""  # the last line of the step's output (pip's, the model's assembly)
    started_at: float = field(default_factory=time.monotonic)

    def step(self, phase: str) -> None:
        self.phase, self.detail = phase, ""

    def line(self, text: str) -> None:
        self.detail = text[-300:]

    def describe(self) -> dict[str, Any]:
        return {"phase": self.phase, "progress": self.detail or None}


class StartupFront:
    def __init__(self, sock: zmq.Socket, progress: StartupProgress, client_endpoint: str, state_dir: str) -> None:
        self.sock = sock
        self.progress = progress
        self.client_endpoint = client_endpoint
        self.state_dir = state_dir
        self.reader = SocketReader(sock, self.on_frames)

    def on_frames(self, frames: list[bytes]) -> None:
        envelope, payload = frames[:-1], frames[-1]
        try:
            event = self._answer(payload)
        except Exception:  # a bug must not stop the start-up
            log.exception("internal error answering a client during start-up")
            event = {"id": None, "event": p.EVENT_ERROR, "code": ErrorCode.INTERNAL, "message": "internal error"}
        send_now(self.sock, [*envelope, p.encode(event)], self.reader)

    def _answer(self, payload: bytes) -> dict[str, Any]:
        try:
            message = p.decode(payload)
        except p.DecodeError as exc:
            return {"id": None, "event": p.EVENT_ERROR, "code": ErrorCode.MALFORMED, "message": str(exc)}
        mid = None
        try:
            mid = message_id(message)
            op = message_op(message)
            if op == p.OP_PING:
                check_bare(message)
                return {
                    "id": mid,
                    "event": p.EVENT_PONG,
                    "protocol": p.PROTOCOL_VERSION,
                    "version": __version__,
                    **self.progress.describe(),
                }
            if op == p.OP_STATUS:
                check_bare(message)
                return {"id": mid, "event": p.EVENT_STATUS, **self.status()}
            if op == p.OP_CANCEL:
                return {"id": mid, "event": p.EVENT_CANCEL_ACK, "target": parse_cancel(message), "found": False}
            raise Refused(
                ErrorCode.NOT_READY,
                f"the daemon is starting ({self.progress.phase}); nothing can be generated yet: "
                "try again once `node-supervisor status` shows an engine ready",
            )
        except ClientError as exc:
            return {"id": mid, "event": p.EVENT_ERROR, "code": exc.code, "message": exc.message}

    def status(self) -> dict[str, Any]:
        """The status op's shape, with what is known before any engine exists."""
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "protocol": p.PROTOCOL_VERSION,
                "uptime_s": round(time.monotonic() - self.progress.started_at, 1),
                "client_endpoint": self.client_endpoint,
                "state_dir": self.state_dir,
                "stopping": False,
                "serving": False,
                **self.progress.describe(),
                "requests_in_progress": 0,
            },
            "gpu": None,
            "engines": [],
        }
