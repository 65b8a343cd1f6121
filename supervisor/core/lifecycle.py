"""A worker's lifecycle: its states, the transitions allowed between them, and
the one method that changes them.  Pure: time is an argument.

Every state change goes through :meth:`Worker.transition`, which checks it
against :data:`ALLOWED`, logs it once as ``old -> new (reason)`` and
publishes it on the event feed.  Only the core's supervisor and engine
starter call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable

from workers.protocol.messages import Failed, Heartbeat, Hello, LoadFailed

from ..logs import get_logger

if TYPE_CHECKING:
    from .request import Generation

log = get_logger("supervisor.lifecycle")


class WorkerState(str, Enum):
    STOPPED = "stopped"  # no process, none wanted
    SPAWNING = "spawning"  # process started, no hello yet
    LOADING = "loading"  # hello received, model loading
    READY = "ready"  # model loaded, serving (one request at a time)
    STOPPING = "stopping"  # shutdown sent, waiting for the exit
    BACKOFF = "backoff"  # exited unexpectedly, restart scheduled (or circuit open)
    FAILED = "failed"  # restarting cannot help (no CUDA, protocol mismatch, bad config)


S = WorkerState

ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    # start, or a failed engine retried by an operator or probe
    S.STOPPED: frozenset({S.SPAWNING, S.FAILED}),
    # hello arrived / died before hello / stop asked before hello
    S.SPAWNING: frozenset({S.LOADING, S.BACKOFF, S.FAILED, S.STOPPING}),
    # loaded / crashed or timed out while loading / refused to load / stop asked
    S.LOADING: frozenset({S.READY, S.BACKOFF, S.FAILED, S.STOPPING}),
    # crashed / exited with a no-retry code / stop asked
    S.READY: frozenset({S.BACKOFF, S.FAILED, S.STOPPING}),
    # exited as asked
    S.STOPPING: frozenset({S.STOPPED}),
    # backoff over: start again / stop asked while waiting / a new plan finds nothing to load
    S.BACKOFF: frozenset({S.SPAWNING, S.STOPPED, S.FAILED}),
    # retried / stop asked
    S.FAILED: frozenset({S.SPAWNING, S.STOPPED}),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: WorkerState, new: WorkerState) -> None:
    if new not in ALLOWED[old]:
        raise IllegalTransition(f"{old.value} -> {new.value} is not allowed")


@dataclass
class WorkerReport:
    """What the current worker process said about itself."""

    hello: Hello | None = None
    model: dict[str, Any] = field(default_factory=dict)
    heartbeat: Heartbeat | None = None
    load_progress: float | None = None
    load_failure: LoadFailed | None = None
    failure: Failed | None = None  # why a ready worker could not go on


@dataclass
class WorkerTimes:
    """When things happened to the current worker process (the daemon's monotonic clock)."""

    started_at: float | None = None
    ready_at: float | None = None
    last_heard: float | None = None  # any message, heartbeats included
    last_progress_at: float | None = None  # last hello or load progress report
    stop_requested_at: float | None = None
    probe_due_at: float | None = None  # next liveness probe of an idle worker
    restart_at: float | None = None  # end of the backoff
    heartbeat_sent_at: float = float("-inf")  # the daemon's last heartbeat to it


StateListener = Callable[["Worker", WorkerState, WorkerState, str], None]


class Worker:
    """One engine's worker, over its successive processes (``<engine>.<n>``)."""

    def __init__(self, engine: str, on_transition: StateListener) -> None:
        self.engine = engine
        self._on_transition = on_transition
        self.state = WorkerState.STOPPED
        self.reason = ""
        self.starts = 0  # processes started for this engine: the worker ids' suffix
        self.worker_id = ""
        self.alive = False  # a process exists (from start until its exit is reported)
        self.running: dict[str, Generation] = {}  # what it generates now, by wire id, in dispatch order
        self.slots = 1  # how many it generates at once (its ready message says; llama.cpp's parallel sequences)
        self.hang_reason: str | None = None  # set when killed as hung
        self.kill_cause: str | None = None  # and why, in a word (core/stats.py RESTART_CAUSES): hang, probe_failure
        self.restarts = 0
        self.last_exit: dict[str, Any] | None = None
        self.report = WorkerReport()
        self.times = WorkerTimes()

    def transition(self, new: WorkerState, reason: str) -> None:
        """The one place a worker's state changes: checked, logged once, published."""
        old = self.state
        check_transition(old, new)
        self.state, self.reason = new, reason
        log.info(f"{old.value} -> {new.value} ({reason})", engine=self.engine, worker_id=self.worker_id or None)
        self._on_transition(self, old, new, reason)

    def begin(self, now: float) -> str:
        """A new process is about to start: a new id, a clean report."""
        self.starts += 1
        self.worker_id = f"{self.engine}.{self.starts}"
        self.alive, self.hang_reason, self.kill_cause, self.slots = True, None, None, 1
        self.report = WorkerReport()
        self.times = WorkerTimes(started_at=now, last_heard=now, last_progress_at=now)
        return self.worker_id

    @property
    def idle(self) -> bool:
        return self.state is WorkerState.READY and not self.running

    @property
    def free_slots(self) -> int:
        """Requests it can take now."""
        return self.slots - len(self.running) if self.state is WorkerState.READY else 0

    @property
    def connected(self) -> bool:
        """Hello received: messages reach it."""
        return self.report.hello is not None

    @property
    def pid(self) -> int | None:
        """The process id its hello gave (NVML counts GPU memory by it); None before the hello."""
        return self.report.hello.pid if self.report.hello else None
