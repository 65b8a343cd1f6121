"""Requests in flight.

A :class:`Request` can be finished exactly once: ``finish`` returns False for
every later attempt, which is how the node keeps its promise of one terminal
event per request whatever workers, deadlines and cancels do at the same time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from workers.protocol import token_event_prefix

from .requests import GenerateParams


@dataclass(eq=False)
class Request:
    client: bytes  # the client's routing envelope, joined: with id, the request's key
    id: str  # the client's id for it
    params: GenerateParams
    envelope: list[bytes] = field(default_factory=list)  # routing frames for replies
    wire_id: str = ""  # the id the worker knows it by; new at every dispatch
    worker_token_prefix: bytes = b""  # how the worker's token messages for wire_id begin
    engine: str = ""  # engine serving it (set when queued)
    received_at: float = field(default_factory=time.monotonic)
    dispatched_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    worker_id: str | None = None
    tokens_sent: int = 0
    text: list[str] = field(default_factory=list)  # kept for stream=false
    attempts: int = 0
    internal: bool = False  # a liveness probe: nobody to answer
    finished: bool = False
    deadline_timer: asyncio.TimerHandle | None = None

    token_event_prefix: bytes = field(init=False)  # how this request's token events to the client begin

    def __post_init__(self) -> None:
        self.token_event_prefix = token_event_prefix(self.id)

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.client, self.id)

    def finish(self) -> bool:
        """Mark finished; True only the first time."""
        if self.finished:
            return False
        self.finished = True
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
        return True

    def timings(self, now: float) -> dict[str, float | None]:
        def ms(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else round((end - start) * 1000, 3)

        return {
            "queued_ms": ms(self.received_at, self.dispatched_at or now),
            "ttft_ms": ms(self.received_at, self.first_token_at),
            "total_ms": ms(self.received_at, now),
        }
