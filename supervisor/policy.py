"""Restart decisions.  Pure: inputs and ``now`` in, decisions out, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass

from workers.protocol import NO_RETRY_EXIT_CODES


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
