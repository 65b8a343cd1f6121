"""One configured engine: its worker slot, its queue, its health and figures."""

from __future__ import annotations

from collections import deque
from typing import Any

from .config import EngineConfig, SupervisionConfig
from .health import EngineLatency
from .lifecycle import SlotState
from .policy import Backoff, CircuitBreaker, LatencyVerdict
from .scheduler import Request
from .slot import WorkerSlot


class EngineRuntime:
    def __init__(self, name: str, config: EngineConfig, model_path: str, slot: WorkerSlot, supervision: SupervisionConfig) -> None:
        self.name = name
        self.config = config
        self.model_path = model_path
        self.slot = slot
        self.queue: deque[Request] = deque()
        self.latency = EngineLatency(supervision.latency_window_s)
        self.backoff = Backoff(supervision.restart_backoff_base_s, supervision.restart_backoff_cap_s, supervision.stable_after_s)
        self.breaker = CircuitBreaker(supervision.circuit_failures, supervision.circuit_window_s, supervision.circuit_open_s)
        self.served = 0
        self.failed = 0
        # Set when retrying cannot help (no CUDA, missing environment): (error code, reason).
        self.hard_failure: tuple[str, str] | None = None

    # --- health ----------------------------------------------------------------

    @property
    def refusal(self) -> tuple[str, str] | None:
        """(code, reason) when this engine takes no traffic at all right now."""
        if self.hard_failure:
            return self.hard_failure
        if not self.breaker.allows_traffic:
            return (self.breaker.code, f"circuit {self.breaker.state.value}: {self.breaker.reason}")
        return None

    @property
    def healthy(self) -> bool:
        """Can take unpinned traffic now: ready, or cold and startable."""
        if self.refusal:
            return False
        if self.slot.state is SlotState.READY:
            return True
        return self.config.standby == "cold" and self.slot.state is SlotState.STOPPED

    def verdict(self, now: float, supervision: SupervisionConfig) -> LatencyVerdict:
        if self.slot.process is None and self.config.standby == "cold":
            # A stopped cold engine cannot be measured: after the dwell time it
            # gets its chance again; if it is still slow it will be left again.
            return LatencyVerdict(breaching=False, recovered=True)
        return self.latency.verdict(
            now, self.config.slo_ttft_ms, self.config.slo_per_token_ms, supervision.latency_min_samples, supervision.latency_hysteresis
        )

    # --- queue -----------------------------------------------------------------

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
        refusal = self.refusal
        return {
            "name": self.name,
            "kind": self.config.kind,
            "priority": self.config.priority,
            "standby": self.config.standby,
            "model": self.model_path,
            "state": refusal[0] if refusal else self.slot.state.value,
            "reason": refusal[1] if refusal else self.slot.state_reason,
            "circuit": self.breaker.state.value,
            "queue_depth": len(self.queue),
            "max_queue": self.config.max_queue,
            "in_flight": 1 if self.slot.current and not self.slot.current.internal else 0,
            "served": self.served,
            "failed": self.failed,
            "latency": self.latency.summary(now),
            "slo": {"ttft_ms": self.config.slo_ttft_ms, "per_token_ms": self.config.slo_per_token_ms},
            "workers": [self.slot.describe(now)],
        }

