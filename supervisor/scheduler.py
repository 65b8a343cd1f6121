"""Requests and per-engine FIFO queues.

A :class:`Request` can be finished exactly once: ``finish`` returns False for
every later attempt, which is how the node keeps its promise of one terminal
event per request whatever workers, deadlines and cancels do at the same time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .config import EngineConfig
from .health import EngineLatency
from .requests import GenerateParams
from .slot import WorkerSlot


@dataclass(eq=False)
class Request:
    client: bytes  # the client's routing envelope, joined: with id, the request's key
    id: str  # the client's id for it
    params: GenerateParams
    envelope: list[bytes] = field(default_factory=list)  # routing frames for replies
    wire_id: str = ""  # the id the worker knows it by; new at every dispatch
    engine: str = ""  # engine serving it (set when queued)
    received_at: float = field(default_factory=time.monotonic)
    dispatched_at: float | None = None
    first_token_at: float | None = None
    worker_id: str | None = None
    tokens_sent: int = 0
    text: list[str] = field(default_factory=list)  # kept for stream=false
    attempts: int = 0
    finished: bool = False
    deadline_timer: asyncio.TimerHandle | None = None

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


class EngineRuntime:
    """One configured engine: its worker slot, its queue, its figures."""

    def __init__(self, name: str, config: EngineConfig, model_path: str, slot: WorkerSlot | None) -> None:
        self.name = name
        self.config = config
        self.model_path = model_path
        self.slot = slot
        self.queue: deque[Request] = deque()
        self.latency = EngineLatency()
        self.served = 0
        self.failed = 0
        # Set when the engine cannot serve at all: (error code, reason).
        self.unusable: tuple[str, str] | None = None

    @property
    def queue_full(self) -> bool:
        return len(self.queue) >= self.config.max_queue

    def remove(self, request: Request) -> bool:
        try:
            self.queue.remove(request)
            return True
        except ValueError:
            return False

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.config.kind,
            "priority": self.config.priority,
            "model": self.model_path,
            "state": self.unusable[0] if self.unusable else (self.slot.state.value if self.slot else "stopped"),
            "reason": self.unusable[1] if self.unusable else (self.slot.state_reason if self.slot else ""),
            "queue_depth": len(self.queue),
            "max_queue": self.config.max_queue,
            "in_flight": 1 if self.slot and self.slot.current else 0,
            "served": self.served,
            "failed": self.failed,
            "latency": self.latency.summary(),
            "workers": [self.slot.describe(now)] if self.slot else [],
        }
