"""What each engine has done, in plain numbers: requests by how they ended, tokens,
spend, latency histograms and worker restarts.  Pure.

Written only by the router (a request's tokens and its one end) and the
supervisor (a restart); the status op and the metrics exporter read it.  The
histograms keep bucket counts with fixed upper bounds, as a Prometheus
histogram exposes them; the bounds are vLLM's, with smaller ones in front
for local engines (docs/METRICS.md).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from workers import protocol as p
from workers.protocol.messages import LoadFailed

from ..config import EngineConfig
from .request import Generation

# Upper bounds in seconds, inclusive (a Prometheus histogram's "le").
TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
INTER_TOKEN_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_BUCKETS_S = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

# Why a worker was started again after an exit nobody asked for.
RESTART_CAUSES = ("crash", "hang", "probe_failure", "oom", "load_failure")


def restart_cause(kill_cause: str | None, load_failure: LoadFailed | None) -> str:
    """One of RESTART_CAUSES: killed by the supervisor (hung, failed its liveness probe), or ended on its own."""
    if kill_cause:
        return kill_cause
    if load_failure:
        return "oom" if load_failure.code == p.ErrorCode.GPU_OUT_OF_MEMORY else "load_failure"
    return "crash"


class Histogram:
    """Observations counted into fixed buckets, with their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += weight
        self.sum += value * weight

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or under it), ending with +Inf and the count."""
        running, rows = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            rows.append((bound, running))
        return rows


@dataclass
class TokenTotals:
    prompt: int = 0
    completion: int = 0


def _tokens(value: Any) -> int:
    """A token count from a worker's usage; anything that is not one counts as none."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _bump(tally: dict[str, int], key: str) -> None:
    tally[key] = tally.get(key, 0) + 1


@dataclass
class EngineStats:
    """One engine's figures since the daemon started (and, for tokens and spend, since the day turned)."""

    finished: dict[str, int] = field(
        default_factory=lambda: {p.FINISH_STOP: 0, p.FINISH_LENGTH: 0, p.FINISH_CANCELLED: 0}
    )
    errors: dict[str, int] = field(default_factory=dict)  # requests that ended with an error, by code
    refused: dict[str, int] = field(default_factory=dict)  # generate ops refused on arrival, by code
    restarts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESTART_CAUSES, 0))
    tokens: TokenTotals = field(default_factory=TokenTotals)
    tokens_today: TokenTotals = field(default_factory=TokenTotals)
    spent: float = 0.0
    spent_today: float = 0.0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))  # arrival to first token
    inter_token: Histogram = field(default_factory=lambda: Histogram(INTER_TOKEN_BUCKETS_S))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS_S))  # arrival to end
    queue: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS_S))  # arrival to (last) dispatch

    @property
    def served(self) -> int:
        return sum(self.finished.values())

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def record_tokens(self, generation: Generation, previous_at: float | None, tokens: int, now: float) -> None:
        """A client request's token event: its first gives the time to first token, each later one
        the time between tokens (an event of n tokens counts as n gaps of an nth of the wait)."""
        if previous_at is None:
            self.ttft.observe(now - generation.received_at)
        elif tokens > 0:
            self.inter_token.observe((now - previous_at) / tokens, tokens)

    def record_end(self, generation: Generation, event: dict[str, Any], now: float, config: EngineConfig) -> None:
        """A client request's terminal event: how it ended, its tokens (the worker's usage, else
        the tokens streamed) and what they cost, its latencies."""
        if event["event"] == p.EVENT_ERROR:
            _bump(self.errors, str(event["code"]))
        else:  # done, or an embed op's embeddings (which ends as "stop": nothing cut it short)
            _bump(self.finished, str(event.get("finish_reason", p.FINISH_STOP)))
        usage = event.get("usage") or {}
        prompt = _tokens(usage.get("prompt_tokens"))
        completion = (
            _tokens(usage["completion_tokens"]) if usage.get("completion_tokens") is not None else generation.tokens
        )
        for totals in (self.tokens, self.tokens_today):
            totals.prompt += prompt
            totals.completion += completion
        cost = (prompt * config.price_input_per_mtok + completion * config.price_output_per_mtok) / 1_000_000
        self.spent += cost
        self.spent_today += cost
        self.e2e.observe(now - generation.received_at)
        if generation.dispatched_at is not None:
            self.queue.observe(generation.dispatched_at - generation.received_at)

    def record_refusal(self, code: str) -> None:
        _bump(self.refused, code)

    def record_restart(self, cause: str) -> None:
        _bump(self.restarts, cause)

    def new_day(self) -> None:
        self.tokens_today, self.spent_today = TokenTotals(), 0.0

    def budget_exhausted(self, config: EngineConfig) -> bool:
        return config.daily_budget is not None and self.spent_today >= config.daily_budget

    def describe(self, config: EngineConfig) -> dict[str, Any]:
        """The status op's token and cost figures."""
        return {
            "tokens": {
                "prompt": self.tokens.prompt,
                "completion": self.tokens.completion,
                "prompt_today": self.tokens_today.prompt,
                "completion_today": self.tokens_today.completion,
            },
            "cost": {
                "today": round(self.spent_today, 6),
                "total": round(self.spent, 6),
                "daily_budget": config.daily_budget,
                "budget_exhausted": self.budget_exhausted(config),
                "price_input_per_mtok": config.price_input_per_mtok,
                "price_output_per_mtok": config.price_output_per_mtok,
            },
        }
