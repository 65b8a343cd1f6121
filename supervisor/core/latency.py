"""Rolling latency windows: time to first token and per-token time, per engine.

Samples are time-stamped so the latency policy judges only the recent past
(``window_s``); status reports the same windows.  TTFT here is measured from
dispatch to the worker, not from arrival: queueing says how loaded the node
is, not how healthy the engine is.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .policy import LatencyVerdict


class LatencyWindow:
    """Samples (time, milliseconds) from the last ``window_s`` seconds, at most ``size``."""

    def __init__(self, window_s: float = 60.0, size: int = 1024) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)

    def add(self, now: float, value_ms: float) -> None:
        self._samples.append((now, value_ms))

    def values(self, now: float) -> list[float]:
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        return [value for _, value in self._samples]

    def percentile(self, now: float, q: float) -> float | None:
        """Nearest-rank percentile, q in [0, 100]; None without samples."""
        ordered = sorted(self.values(now))
        if not ordered:
            return None
        rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
        return round(ordered[int(rank) - 1], 3)

    def summary(self, now: float) -> dict[str, Any]:
        return {"p50": self.percentile(now, 50), "p95": self.percentile(now, 95), "samples": len(self.values(now))}


class EngineLatency:
    def __init__(self, window_s: float = 60.0) -> None:
        self.ttft = LatencyWindow(window_s)
        self.per_token = LatencyWindow(window_s)

    def record(self, now: float, ttft_ms: float | None, decode_ms: float, tokens: int) -> None:
        if ttft_ms is not None:
            self.ttft.add(now, ttft_ms)
        if tokens > 1:
            self.per_token.add(now, decode_ms / (tokens - 1))

    def summary(self, now: float) -> dict[str, Any]:
        return {"ttft_ms": self.ttft.summary(now), "per_token_ms": self.per_token.summary(now)}

    def verdict(
        self, now: float, slo_ttft_ms: float | None, slo_per_token_ms: float | None, min_samples: int, hysteresis: float
    ) -> LatencyVerdict:
        """Breaching: a p95 over its objective.  Recovered: every p95 under objective x hysteresis."""
        breaching, recovered = False, True
        for window, objective in ((self.ttft, slo_ttft_ms), (self.per_token, slo_per_token_ms)):
            if objective is None:
                continue
            if len(window.values(now)) < min_samples:
                recovered = False
                continue
            p95 = window.percentile(now, 95) or 0.0
            breaching = breaching or p95 > objective
            recovered = recovered and p95 <= objective * hysteresis
        return LatencyVerdict(breaching=breaching, recovered=recovered)
