"""What the daemon tells systemd while it runs: ready, a status line, the watchdog.

READY=1 goes out once an engine can generate (or, with ``systemd_ready =
"bound"``, as soon as the client socket is bound), or once no engine can
serve at all, so that systemd does not hold a daemon that answers status as
"starting" for ever.  Until then start-up is extended a tick at a time while
workers load.  WATCHDOG=1 is sent from the event loop's own tick: a blocked
loop stops feeding it, and systemd restarts the daemon.
"""

from __future__ import annotations

import time

from ..core.engines import Engines
from ..core.lifecycle import WorkerState
from ..core.router import Router
from ..io.sd_notify import Notifier

LOAD_EXTENSION_S = 30.0  # each tick while loading pushes systemd's start timeout this far ahead


class ServiceNotices:
    """``ready_when_bound``: READY=1 at once (``systemd_ready = "bound"``), not when an engine serves."""

    def __init__(self, notifier: Notifier, engines: Engines, router: Router, ready_when_bound: bool) -> None:
        self.notifier = notifier
        self.engines = engines
        self.router = router
        self.ready_when_bound = ready_when_bound
        self.ready_sent = False
        self._last_status = ""
        self._last_watchdog = float("-inf")
        self._last_extension = float("-inf")

    def tick(self, now: float) -> None:
        if not self.notifier.enabled:
            return
        status = self.status_line()
        if not self.ready_sent and self._ready():
            self.ready_sent = self.notifier.ready(status)
            self._last_status = status
        elif not self.ready_sent and now - self._last_extension >= LOAD_EXTENSION_S / 3:
            self._last_extension = now
            self.notifier.extend_timeout(LOAD_EXTENSION_S)
        if status != self._last_status:
            self._last_status = status
            self.notifier.status(status)
        watchdog_s = self.notifier.watchdog_s
        if watchdog_s is not None and now - self._last_watchdog >= watchdog_s / 2:
            self._last_watchdog = now
            self.notifier.watchdog()

    def _ready(self) -> bool:
        engines = list(self.engines)
        if self.ready_when_bound:
            return True
        return any(e.worker.state is WorkerState.READY for e in engines) or all(e.refusal is not None for e in engines)

    def status_line(self) -> str:
        """One line for `systemctl status`: each engine's state, what waits, what runs."""
        engines = self.engines.by_priority()
        parts = [f"{e.name} {e.refusal[0] if e.refusal else e.worker.state.value}" for e in engines]
        waiting = sum(len(e.queue) for e in engines)
        return f"engines: {', '.join(parts)}; requests {len(self.router.requests)}, waiting {waiting}"

    def reloading(self) -> None:
        if self.notifier.enabled:
            self.notifier.reloading(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def reloaded(self) -> None:
        """READY=1 again: systemd's reload job ends (the engines may still be restarting)."""
        if self.notifier.enabled:
            self._last_status = self.status_line()
            self.notifier.ready(self._last_status)

    def stopping(self) -> None:
        self.notifier.stopping("stopping: finishing requests, stopping workers")
