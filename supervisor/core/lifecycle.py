"""Worker slot states and the transitions allowed between them.  Pure.

Every state change goes through :func:`check_transition`, called by the one
method that changes a slot's state (WorkerSlot.set_state), which logs it once
as ``old -> new (reason)``.
"""

from __future__ import annotations

from enum import Enum


class SlotState(str, Enum):
    STOPPED = "stopped"  # no process, none wanted
    SPAWNING = "spawning"  # process started, no hello yet
    LOADING = "loading"  # hello received, model loading
    READY = "ready"  # model loaded, serving (one request at a time)
    STOPPING = "stopping"  # shutdown sent, waiting for the exit
    BACKOFF = "backoff"  # exited unexpectedly, restart scheduled
    FAILED = "failed"  # restarting cannot help (bad model, no GPU, protocol mismatch)


S = SlotState

ALLOWED: dict[SlotState, frozenset[SlotState]] = {
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
    # backoff over: start again / stop asked while waiting
    S.BACKOFF: frozenset({S.SPAWNING, S.STOPPED}),
    # retried / stop asked
    S.FAILED: frozenset({S.SPAWNING, S.STOPPED}),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: SlotState, new: SlotState) -> None:
    if new not in ALLOWED[old]:
        raise IllegalTransition(f"{old.value} -> {new.value} is not allowed")
