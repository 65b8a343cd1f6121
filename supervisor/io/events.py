"""The event feed: a ZeroMQ PUB socket operators and tools can watch.

Each event is two frames: the topic (UTF-8) and a JSON object.  Subscribers
filter by topic prefix (``worker.``, ``engine.``, ...).  The topics are
named in core/effects.py; docs/PROTOCOL.md lists them and their fields.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from workers import protocol as p

from ..logs import get_logger
from .transport import SocketReader

TOPIC_FEED_SUBSCRIBED = "feed.subscribed"  # prefix: a subscription reached the daemon

log = get_logger("supervisor.events")


class EventPublisher:
    """Publishes on an XPUB socket, which also tells it of each new subscription:
    it answers each with a ``feed.subscribed`` event, so a watcher knows when
    its subscription is in place (ZeroMQ's "slow joiner") instead of guessing."""

    def __init__(self, socket: zmq.Socket | None) -> None:
        self._socket = socket
        self.reader = SocketReader(socket, self._on_subscription) if socket is not None else None

    def _on_subscription(self, frames: list[bytes]) -> None:
        message = frames[-1]
        if message[:1] == b"\x01":  # subscribe (\x00 is unsubscribe)
            self.publish(TOPIC_FEED_SUBSCRIBED, prefix=message[1:].decode("utf-8", "replace"))

    def close(self) -> None:
        if self.reader is not None:
            self.reader.stop()
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
