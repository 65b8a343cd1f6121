"""The event feed: a ZeroMQ PUB socket operators and tools can watch.

Each event is two frames: the topic (UTF-8) and a JSON object.  Subscribers
filter by topic prefix (``worker.``, ``engine.``, ...).  docs/PROTOCOL.md
lists the topics and their fields.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from workers import protocol as p

from .logs import get_logger

log = get_logger("supervisor.events")

TOPIC_WORKER_STATE = "worker.state"  # engine, worker_id, old, new, reason
TOPIC_WORKER_EXIT = "worker.exit"  # engine, worker_id, exit_code, signal, cause, last_lines, restarts
TOPIC_WORKER_HANG = "worker.hang"  # engine, worker_id, reason
TOPIC_ENGINE_CIRCUIT = "engine.circuit"  # engine, state, code, reason
TOPIC_ENGINE_SWITCH = "engine.switch"  # from, to, reason
TOPIC_PROBE = "probe.result"  # engine, worker_id, ok, ttft_ms, error
TOPIC_REQUEST_RETRY = "request.retry"  # request_id, from_worker, engine, cause


class EventPublisher:
    def __init__(self, socket: zmq.Socket | None) -> None:
        self._socket = socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()

    def publish(self, topic: str, **fields: Any) -> None:
        if self._socket is None:
            return
        payload = {"topic": topic, "time": time.time(), **fields}
        try:
            self._socket.send_multipart([topic.encode(), p.encode(payload)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a full or closed PUB socket must never stop supervision
            log.debug("event dropped", topic=topic, error=str(exc))
