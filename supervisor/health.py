"""Rolling latency windows: time to first token and per-token time, per engine."""

from __future__ import annotations

from collections import deque
from typing import Any


class LatencyWindow:
    """The last ``size`` samples of one measure, in milliseconds."""

    def __init__(self, size: int = 256) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value_ms: float) -> None:
        self._samples.append(value_ms)

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile, q in [0, 100]; None without samples."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
        return round(ordered[int(rank) - 1], 3)

    def summary(self) -> dict[str, Any]:
        return {"p50": self.percentile(50), "p95": self.percentile(95), "samples": len(self._samples)}


class EngineLatency:
    def __init__(self, size: int = 256) -> None:
        self.ttft = LatencyWindow(size)
        self.per_token = LatencyWindow(size)

    def record(self, ttft_ms: float | None, decode_ms: float, tokens: int) -> None:
        if ttft_ms is not None:
            self.ttft.add(ttft_ms)
        if tokens > 1:
            self.per_token.add(decode_ms / (tokens - 1))

    def summary(self) -> dict[str, Any]:
        return {"ttft_ms": self.ttft.summary(), "per_token_ms": self.per_token.summary()}
