"""The daemon inside the service's process: run it, stop it from another thread, say why it failed.

Nothing here touches pywin32, so it is the same on every platform; the
service module (service.py) turns what happens here into service statuses
and event-log entries.

The daemon runs on the thread that calls :meth:`ServiceRun.run` (the
service manager's service thread), exactly as ``node-supervisor run`` runs
it: preflight checks, logging, the state-directory lock, environments, then
the event loop.  A stop arrives on another thread and goes to the daemon's
one ordered stop through :class:`supervisor.daemon.run.DaemonHandle`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from supervisor.config import ConfigError, Settings
from supervisor.daemon.run import DaemonHandle, run_daemon
from supervisor.io.sd_notify import Notifier
from workers.protocol import ExitCode

from .paths import load_service_settings

PROGRESS_MIN_INTERVAL_S = (
    1.0  # a build prints thousands of lines; the service manager hears of progress at most this often
)
EXIT_MEANINGS = {
    ExitCode.CRASH: "internal error",
    ExitCode.UNAVAILABLE: "the engine environments could not be prepared",
    ExitCode.TEMPFAIL: "the state directory or an endpoint is in use",
    ExitCode.CONFIG: "configuration error",
}


@dataclass
class RunOutcome:
    code: int
    served: bool  # the daemon reached serving before it ended
    reason: str = ""  # why it failed, in one line ("" when code is 0)
    log_dir: str = ""

    def message(self) -> str:
        """The event log's line for a failure."""
        what = "stopped with an error" if self.served else "did not start"
        meaning = EXIT_MEANINGS.get(self.code, "error")
        text = f"node-supervisor {what} (exit code {self.code}: {meaning})"
        text += f": {self.reason.removeprefix('config error: ')}" if self.reason else ""
        return text + (f". The daemon's log is in {self.log_dir}" if self.log_dir else "")


class ServiceRun:
    """One run of the daemon.  ``on_progress(wait_ms)``: start-up goes on and
    may take this long again; ``on_serving(settings)``: it serves (not
    called when a stop came first)."""

    def __init__(self, on_progress: Callable[[int], None], on_serving: Callable[[Settings], None]) -> None:
        self._on_progress = on_progress
        self._on_serving = on_serving
        self._lock = threading.Lock()
        self._handle: DaemonHandle | None = None
        self._stop_reason: str | None = None
        self.settings: Settings | None = None
        self.served = False

    def run(self) -> RunOutcome:
        """Blocks until the daemon has stopped (or failed to start)."""
        with _stderr_tail() as tail:
            try:
                self.settings = load_service_settings()
            except ConfigError as exc:
                return RunOutcome(ExitCode.CONFIG, False, f"config error: {exc}")
            log_dir = str(self.settings.log_dir)
            try:
                code = run_daemon(
                    self.settings, self.settings.create_envs, _StartProgress(self._on_progress), self._serving
                )
            except Exception as exc:  # a bug: the event log says so, the daemon's log has the traceback
                logging.getLogger("winservice").exception("the daemon failed")
                return RunOutcome(ExitCode.CRASH, self.served, f"{type(exc).__name__}: {exc}", log_dir)
        return RunOutcome(code, self.served, failure_reason(tail.lines) if code else "", log_dir if code else "")

    def stop(self, reason: str) -> None:
        """From any thread.  Before the daemon serves, the stop waits for it
        (environments may be building) and is carried out as it starts serving."""
        with self._lock:
            self._stop_reason = self._stop_reason or reason
            handle = self._handle
        if handle is not None:
            handle.stop(reason)

    def _serving(self, handle: DaemonHandle) -> None:
        with self._lock:
            self._handle = handle
            self.served = True
            early_stop = self._stop_reason
        if early_stop is not None:
            handle.stop(early_stop)
            return
        assert self.settings is not None
        self._on_serving(self.settings)


class _StartProgress(Notifier):
    """The daemon's start-up messages for systemd (one per build line),
    read as progress for the service manager's start-pending checkpoints."""

    def __init__(self, on_progress: Callable[[int], None]) -> None:
        super().__init__({})
        self._on_progress = on_progress
        self._last = float("-inf")

    def send(self, *assignments: str) -> bool:
        for assignment in assignments:
            key, _, value = assignment.partition("=")
            if (
                key == "EXTEND_TIMEOUT_USEC"
                and value.isdigit()
                and time.monotonic() - self._last >= PROGRESS_MIN_INTERVAL_S
            ):
                self._last = time.monotonic()
                self._on_progress(int(value) // 1000)
        return True


def failure_reason(lines: list[str]) -> str:
    """The daemon's last word before it gave up: its last error log line or
    ``node-supervisor: …`` message on stderr (where a start-up failure is told)."""
    for line in reversed(lines):
        text = line.strip()
        if text.startswith("node-supervisor: "):
            return text[len("node-supervisor: ") :]
        if text.startswith("{"):
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("level") in ("error", "critical"):
                detail = record.get("error")
                return f"{record.get('event')}: {detail}" if detail else str(record.get("event"))
    return ""


class _TailStream(io.TextIOBase):
    """stderr for the daemon's run: passed on to the real stderr (if the
    process has one; a service has none) and its last lines kept."""

    def __init__(self, original: object) -> None:
        self.original = original
        self.lines: deque[str] = deque(maxlen=20)
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if self.original is not None:
            try:
                self.original.write(text)  # type: ignore[attr-defined]
            except (OSError, ValueError):
                pass
        with self._lock:
            *complete, self._partial = (self._partial + text).split("\n")
            self.lines.extend(complete)
        return len(text)

    def flush(self) -> None:
        if self.original is not None:
            try:
                self.original.flush()  # type: ignore[attr-defined]
            except (OSError, ValueError):
                pass

    def isatty(self) -> bool:
        return False  # the log's console copy is JSON: the failure reason is read back from it


@contextmanager
def _stderr_tail() -> Iterator[_TailStream]:
    """Under the service manager sys.stdout and sys.stderr are None; logging and print need streams."""
    original_out, original_err = sys.stdout, sys.stderr
    devnull = open(os.devnull, "w") if sys.stdout is None else None
    sys.stdout = devnull or sys.stdout
    tail = _TailStream(original_err)
    sys.stderr = tail
    try:
        yield tail
    finally:
        sys.stdout, sys.stderr = original_out, original_err
        if devnull is not None:
            devnull.close()
