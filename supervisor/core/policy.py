"""Supervision decisions.  Pure: inputs and ``now`` in, decisions out, no I/O.

The node owns one Backoff and one CircuitBreaker per engine and one
LatencySwitch for the whole node; tests drive them with a fake clock.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from workers.protocol import NO_RETRY_EXIT_CODES

MAX_RETRY_AFTER_S = 3600.0  # a Retry-After beyond this is read as this


@dataclass
class Backoff:
    """Exponential backoff with jitter, reset once a worker has been healthy a while."""

    base_s: float = 1.0
    cap_s: float = 30.0
    stable_after_s: float = 60.0
    failures: int = 0

    def next_delay(self, ready_since: float | None, now: float, rng: random.Random | None = None) -> float:
        """Delay before the next start; call once per unexpected exit."""
        if ready_since is not None and now - ready_since >= self.stable_after_s:
            self.failures = 0
        self.failures += 1
        delay = min(self.cap_s, self.base_s * 2 ** (self.failures - 1))
        return delay * (0.5 + (rng or random).random() / 2)  # jitter: 50-100 % of the delay


def retry_can_help(exit_code: int | None) -> bool:
    """Exit codes that say the same start would fail the same way mark the engine failed."""
    return exit_code not in NO_RETRY_EXIT_CODES


def retry_after(retry_after_s: float | None) -> float:
    """How long a worker's failure report asked the restart to wait (a remote engine's
    upstream said Retry-After), at most an hour; 0 when it did not say."""
    if retry_after_s is None or not retry_after_s > 0:
        return 0.0
    return min(retry_after_s, MAX_RETRY_AFTER_S)


class Circuit(str, Enum):
    CLOSED = "closed"  # traffic flows
    OPEN = "open"  # too many failures: traffic goes elsewhere until the probe time
    HALF_OPEN = "half_open"  # one probe start is under way; its outcome decides


@dataclass
class CircuitBreaker:
    """Opens after ``threshold`` failures within ``window_s``; probes again after ``open_s``."""

    threshold: int = 3
    window_s: float = 60.0
    open_s: float = 30.0
    state: Circuit = Circuit.CLOSED
    opened_at: float | None = None
    reason: str = ""
    code: str = ""
    _failures: deque[float] = field(default_factory=deque)

    def record_failure(self, now: float, code: str, reason: str) -> bool:
        """Count a failure; True when this failure opened (or re-opened) the circuit."""
        self.code, self.reason = code, reason
        if self.state is Circuit.HALF_OPEN:  # the probe failed: open again, wait again
            self._open(now)
            return True
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.window_s:
            self._failures.popleft()
        if self.state is Circuit.CLOSED and len(self._failures) >= self.threshold:
            self._open(now)
            return True
        return False

    def trip(self, now: float, code: str, reason: str) -> None:
        """Open at once: a failure that needs no counting (the model file is not there)."""
        self.code, self.reason = code, reason
        self._open(now)

    def _open(self, now: float) -> None:
        self.state, self.opened_at = Circuit.OPEN, now
        self._failures.clear()

    def probe_due(self, now: float) -> bool:
        """True once per open period, when it is time to try the engine again (goes half-open)."""
        if self.state is Circuit.OPEN and self.opened_at is not None and now - self.opened_at >= self.open_s:
            self.state = Circuit.HALF_OPEN
            return True
        return False

    def record_success(self) -> bool:
        """A worker loaded: an open or half-open circuit closes (True).  A closed one keeps
        the failures it counted until they leave the window: a worker that loads and then
        fails every time (a remote engine whose upstream answers 429) is still failing."""
        if self.state is Circuit.CLOSED:
            return False
        self.state, self.opened_at, self.reason, self.code = Circuit.CLOSED, None, "", ""
        self._failures.clear()
        return True

    @property
    def allows_traffic(self) -> bool:
        return self.state is Circuit.CLOSED


@dataclass
class LatencyVerdict:
    """One engine's latency as the switch sees it."""

    breaching: bool  # p95 over the objective in the current window
    recovered: bool  # p95 under objective x hysteresis, with enough samples


@dataclass
class LatencySwitch:
    """Which engine takes unpinned traffic, given health and latency.

    * the active engine unhealthy: move to the first healthy engine at once;
    * the active engine breaching its objective for ``breach_for_s``, and a
      healthy engine that is not breaching exists: move to it, but not sooner
      than ``min_dwell_s`` after the last switch (no flapping);
    * the preferred engine (first by priority) healthy, dwell time over, and,
      if it was left for its latency, recovered: move back to it.

    The first choice at start does not count as a switch for the dwell time.
    """

    min_dwell_s: float = 30.0
    breach_for_s: float = 10.0
    active: str | None = None
    switched_at: float = float("-inf")
    _breach_since: float | None = None
    _left_for_latency: set[str] = field(default_factory=set)

    def decide(
        self, now: float, by_priority: list[str], healthy: set[str], verdicts: dict[str, LatencyVerdict]
    ) -> tuple[str | None, str]:
        """Return (engine for unpinned traffic, why it changed or "")."""
        candidates = [name for name in by_priority if name in healthy]
        if not candidates:
            return self.active, ""
        if self.active is None:
            self.active = candidates[0]
            return self.active, "start"
        if self.active not in candidates:
            return self._switch(now, candidates[0], "active engine unhealthy")
        active_verdict = verdicts.get(self.active, LatencyVerdict(False, False))
        if active_verdict.breaching:
            self._breach_since = self._breach_since if self._breach_since is not None else now
        else:
            self._breach_since = None
        dwell_over = now - self.switched_at >= self.min_dwell_s
        if self._breach_since is not None and now - self._breach_since >= self.breach_for_s and dwell_over:
            for name in candidates:
                if name != self.active and not verdicts.get(name, LatencyVerdict(False, False)).breaching:
                    self._left_for_latency.add(self.active)
                    return self._switch(now, name, f"{self.active} over its latency objective")
        preferred = candidates[0]
        if preferred != self.active and dwell_over:
            if preferred not in self._left_for_latency:
                return self._switch(now, preferred, f"{preferred} healthy again")
            if verdicts.get(preferred, LatencyVerdict(False, False)).recovered:
                self._left_for_latency.discard(preferred)
                return self._switch(now, preferred, f"{preferred} recovered")
        return self.active, ""

    def _switch(self, now: float, to: str, why: str) -> tuple[str, str]:
        self.active, self.switched_at, self._breach_since = to, now, None
        return to, why
