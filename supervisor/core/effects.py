"""The only way the core acts on the world.

The router and the supervisor decide; the daemon carries the decisions out
by implementing this protocol (processes, sockets, the event feed, timers).
Tests implement it with a recording fake and drive the core with a manual
clock, so every routing and failover rule is checked without a process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from workers.protocol.messages import Message

from ..planning.decide.types import Plan
from .placement import GpuRoom


@dataclass(frozen=True)
class WorkerLaunch:
    """Everything needed to start one worker process for an engine."""

    engine: str
    kind: str
    env_name: str
    worker_id: str
    devices: tuple[int, ...] | None = None  # the GPUs it may see (CUDA_VISIBLE_DEVICES); None: as the node is


class NodeFacts(Protocol):
    """What the core asks about the node: questions, answered from the world as it is now,
    that change nothing (the planner's port).  The daemon answers them; tests answer with
    recorded figures."""

    def model_present(self, path: str) -> bool:
        """Whether a model file exists now (a missing one may be put in place later)."""

    def build_warning(self, kind: str, versions: dict[str, Any]) -> str | None:
        """What is wrong with a worker's engine build on this node (a CPU-only llama.cpp on a GPU node), with the fix."""

    def plan_load(self, engine: str, previous: Plan | None, after_oom: bool) -> Plan | None:
        """Plan the engine's next load against the GPU as it is now, or None when the engine is
        not planned (no model facts: it loads as configured).  ``previous`` is the plan in force;
        ``after_oom``: its choice just ran out of GPU memory."""

    def gpu_room(self) -> GpuRoom | None:
        """The GPUs as measured now (room per device after the reserve, NVML's bytes per process),
        or None on a node without a GPU to place on."""


class Effects(NodeFacts, Protocol):
    """The commands the core gives the world (and, inherited, the questions it asks)."""

    def start_worker(self, launch: WorkerLaunch) -> None:
        """Spawn the worker process; its exit is reported back through Supervision.on_exit."""

    def stop_worker(self, worker_id: str, connected: bool) -> None:
        """Ask the worker to exit: a shutdown message if it is connected, else SIGTERM."""

    def kill_worker(self, worker_id: str, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``: for hung or lingering workers."""

    def send_worker(self, worker_id: str, message: Message) -> None:
        """A message on the worker's main socket (dropped if it is not connected)."""

    def send_heartbeat(self, worker_id: str) -> None:
        """The daemon's heartbeat, on the worker's watchdog socket."""

    def send_client(self, envelope: list[bytes], frame: bytes) -> bool:
        """One encoded event to a client; False when the client cannot take it (gone or too far behind)."""

    def publish(self, topic: str, **fields: Any) -> None:
        """An event on the feed operators watch."""

    def wake_at(self, when: float) -> None:
        """Call the core's tick no later than ``when`` (a deadline or a restart is due)."""


# Topics of the event feed (docs/PROTOCOL.md lists their fields).
TOPIC_WORKER_STATE = "worker.state"  # engine, worker_id, old, new, reason
TOPIC_WORKER_EXIT = "worker.exit"  # engine, worker_id, exit_code, signal, cause, intended, last_lines
TOPIC_WORKER_HANG = "worker.hang"  # engine, worker_id, reason
TOPIC_WORKER_REFUSED = "worker.refused"  # a process that is not one of this daemon's workers: routing_id
TOPIC_ENGINE_CIRCUIT = "engine.circuit"  # engine, state, code, reason
TOPIC_ENGINE_SWITCH = "engine.switch"  # from, to, reason
TOPIC_ENGINE_BUDGET = "engine.budget"  # engine, exhausted, day, spent_today, daily_budget
TOPIC_PROBE = "probe.result"  # engine, worker_id, ok, ttft_ms, error
TOPIC_REQUEST_RETRY = "request.retry"  # request_id, from_worker, engine, cause
TOPIC_ENGINE_PLAN = (
    "engine.plan"  # engine, chosen (variant, layers, n_ctx, cache type, device), reasons, warnings, after_oom
)
TOPIC_ENGINE_LOAD = "engine.load"  # engine, worker_id, reason, device
TOPIC_ENGINE_UNLOAD = "engine.unload"  # engine, worker_id, reason, detail
TOPIC_GPU_PRESSURE = "gpu.pressure"  # device, short_mib: free memory below the [gpu] reserve where our models are
TOPIC_RELOAD = "daemon.reload"  # ok, error; added, removed, restarted, updated, unchanged, applied, needs_restart
