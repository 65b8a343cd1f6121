"""The configured engines: each one's queue, health and figures, and the one
place that decides whether a worker process must be started.  Pure.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any, Callable, Iterator

from workers.protocol import FINISH_CANCELLED, ErrorCode
from workers.protocol.messages import CAP_EMBEDDINGS, LOAD_SPEC_FIELDS, LoadSpec

from ..config import EngineConfig, GpuConfig, SupervisionConfig
from ..logs import get_logger
from ..planning.decide.types import Candidate, Plan
from .effects import TOPIC_ENGINE_LOAD, TOPIC_ENGINE_PLAN, Effects, WorkerLaunch
from .latency import EngineLatency
from .lifecycle import StateListener, Worker, WorkerState
from .placement import Residency, describe_residency
from .policy import Backoff, Circuit, CircuitBreaker, LatencyVerdict
from .request import ClientRequest, Generation
from .residency import Residencies
from .room import Rooms, launch_devices
from .stats import EngineStats
from .validate import CAP_GENERATE

log = get_logger("supervisor.engines")


def _describe(chosen: Candidate | None) -> dict[str, Any] | None:
    if chosen is None:
        return None
    return {
        "model": chosen.path,
        "n_gpu_layers": chosen.n_gpu_layers,
        "layers": chosen.layers_text,
        "n_ctx": chosen.n_ctx,
        "cache_type": chosen.cache_type,
        "device": chosen.device,
        "devices": list(chosen.devices),
        "device_mib": [share >> 20 for share in chosen.device_bytes],
        "gpu_bytes": chosen.gpu_bytes,
    }


class EngineState:
    """One named engine instance: its worker, queue, health and counters."""

    def __init__(
        self,
        name: str,
        config: EngineConfig,
        model_path: str,
        supervision: SupervisionConfig,
        on_transition: StateListener,
    ) -> None:
        self.name = name
        self.config = config
        self.model_path = model_path
        self.worker = Worker(name, on_transition)
        self.queue: deque[Generation] = deque()
        self.latency = EngineLatency(supervision.latency_window_s)
        self.backoff = Backoff(
            supervision.restart_backoff_base_s, supervision.restart_backoff_cap_s, supervision.stable_after_s
        )
        self.breaker = CircuitBreaker(
            supervision.circuit_failures, supervision.circuit_window_s, supervision.circuit_open_s
        )
        self.stats = EngineStats()  # kept across reloads, like the queue
        # Set when retrying cannot help (no CUDA, missing environment): (error code, reason).
        self.hard_failure: tuple[str, str] | None = None
        self.plan: Plan | None = None  # in force since the engine's last start; None: loaded as configured
        self.oom_step = False  # the last load ran out of GPU memory: the next plan steps down
        self.build_warnings: list[str] = []  # what the worker's build cannot do on this node, with the fix
        # What its engine can do beyond plain sampling, from its worker's last ready message; None: not known yet
        # (no worker of it was ready), so a request needing something may wait for one to be.
        self.capabilities: frozenset[str] | None = None
        # A configuration reload: the worker finishes what it runs, then goes (core/reload.py).
        self.reload_pending = False  # ... and a worker with the new settings follows
        self.retired = False  # ... and the engine is dropped
        self.residency = Residency(config.keep_alive_s)  # idle unload, placement, loads and unloads
        self.on_demand = config.standby == "cold"  # loaded by the first request naming it (and unloaded ones)

    def take_config(self, fresh: "EngineState") -> None:
        """A reload changed what this engine loads: the new settings, health and figures, the
        queue, counters and running worker kept."""
        self.config, self.model_path, self.hard_failure = fresh.config, fresh.model_path, fresh.hard_failure
        self.latency, self.backoff, self.breaker = fresh.latency, fresh.backoff, fresh.breaker
        self.plan, self.oom_step, self.build_warnings = None, False, []
        self.residency.keep_alive_s = fresh.config.keep_alive_s

    def apply_supervision(self, supervision: SupervisionConfig) -> None:
        """New restart, breaker and latency parameters; what they have counted so far stays."""
        backoff, breaker = self.backoff, self.breaker
        backoff.base_s, backoff.cap_s, backoff.stable_after_s = (
            supervision.restart_backoff_base_s,
            supervision.restart_backoff_cap_s,
            supervision.stable_after_s,
        )
        breaker.threshold, breaker.window_s, breaker.open_s = (
            supervision.circuit_failures,
            supervision.circuit_window_s,
            supervision.circuit_open_s,
        )
        self.latency.ttft.window_s = self.latency.per_token.window_s = supervision.latency_window_s

    @property
    def chosen(self) -> Candidate | None:
        """The plan's choice in force, if the engine is planned."""
        return self.plan.engines[0].chosen if self.plan is not None else None

    @property
    def uses_gpu(self) -> bool:
        """Holds GPU memory when running: "auto" engines as planned, others as configured."""
        if self.config.n_gpu_layers == "auto" and self.config.kind != "exllamav2":
            return self.chosen is not None and self.chosen.n_gpu_layers != 0
        return self.config.uses_gpu

    def load_spec(self) -> LoadSpec:
        """What the worker loads: the plan's choice where there is one, else the configuration
        (llama.cpp's thread and batch settings unset: the worker's default for where the layers run)."""
        config, chosen = self.config, self.chosen
        placed = ("model", "upstream", "split_mib")
        configured = {name: getattr(config, name) for name in LOAD_SPEC_FIELDS if name not in placed}
        spec = LoadSpec(
            **configured,
            model=self.model_path,
            upstream=config.upstream.model_dump() if config.upstream else None,
        )
        if spec.n_gpu_layers == "auto":  # not planned (no model facts): the CPU
            spec = replace(spec, n_gpu_layers=0)
        if chosen is not None:
            spec = replace(
                spec,
                model=chosen.path,
                n_ctx=chosen.n_ctx,
                n_gpu_layers=chosen.n_gpu_layers,
                cache_type=chosen.cache_type,
            )
        shares = self.residency.shares
        if len(shares) > 1:  # split: the share of each device the worker sees, in its order
            spec = replace(spec, split_mib=tuple(share >> 20 for share in shares))
        return spec

    @property
    def refusal(self) -> tuple[str, str] | None:
        """(code, reason) when this engine takes no traffic at all right now."""
        if self.hard_failure:
            return self.hard_failure
        if not self.breaker.allows_traffic:
            return (self.breaker.code, f"circuit {self.breaker.state.value}: {self.breaker.reason}")
        if self.budget_exhausted:
            return (
                ErrorCode.BUDGET_EXHAUSTED,
                f"daily budget {self.config.daily_budget:g} spent ({self.stats.spent_today:.6g}); serving again when the day turns",
            )
        return None

    @property
    def circuit(self) -> Circuit:
        """The breaker's state as availability: an engine that cannot run here at all is open, not closed."""
        return Circuit.OPEN if self.hard_failure else self.breaker.state

    @property
    def budget_exhausted(self) -> bool:
        return self.stats.budget_exhausted(self.config)

    def record_end(self, generation: Generation, event: dict[str, Any], now: float) -> bool:
        """A client request ended here: count it; True when its cost used up the daily budget."""
        exhausted = self.budget_exhausted
        self.stats.record_end(generation, event, now, self.config)
        return self.budget_exhausted and not exhausted

    def waiting(self) -> int:
        """Client requests in the queue."""
        return sum(isinstance(g, ClientRequest) and not g.finished for g in self.queue)

    def in_flight(self) -> int:
        """Client requests its worker generates now."""
        return sum(isinstance(g, ClientRequest) for g in self.worker.running.values())

    @property
    def healthy(self) -> bool:
        """Can take unpinned traffic now: ready, or cold and startable (and not about to restart for a reload)."""
        if self.refusal or self.reload_pending:
            return False
        if self.worker.state is WorkerState.READY:
            return True
        # Loading on demand, or unloaded, is not unhealthy: the next request loads it (again).
        return self.on_demand and self.worker.state in (WorkerState.STOPPED, WorkerState.SPAWNING, WorkerState.LOADING)

    def gpu_need(self) -> int | None:
        """GPU bytes this engine's best load needs (the plan's top candidate, else ``gpu_mib``);
        None: unknown, or nothing on a GPU (it loads as planned or configured)."""
        if self.plan is not None:
            detail = self.plan.engines[0]
            return detail.candidates[0].gpu_bytes if detail.device is not None and detail.candidates else None
        return self.config.gpu_mib << 20 if self.config.gpu_mib else None

    def verdict(self, now: float, supervision: SupervisionConfig) -> LatencyVerdict:
        if not self.worker.alive and self.config.standby == "cold":
            # A stopped cold engine cannot be measured: after the dwell time it
            # gets its chance again; if it is still slow it will be left again.
            return LatencyVerdict(breaching=False, recovered=True)
        return self.latency.verdict(
            now,
            self.config.slo_ttft_ms,
            self.config.slo_per_token_ms,
            supervision.latency_min_samples,
            supervision.latency_hysteresis,
        )

    def lacks(self, needs: dict[str, str]) -> dict[str, str]:
        """Of the capabilities a request needs (capability -> its field), those this engine is known not to have.

        Whether it generates or embeds its configuration says (``embedding``) before any ready message: an
        engine does one or the other.  The rest is known once its worker was ready (its ``capabilities``)."""
        if not needs:
            return {}
        embeds, known = self.config.embedding, self.capabilities
        return {
            capability: name
            for capability, name in needs.items()
            if (capability == CAP_GENERATE and embeds)
            or (capability == CAP_EMBEDDINGS and not embeds)
            or (capability != CAP_GENERATE and known is not None and capability not in known)
        }

    @property
    def has_room(self) -> bool:
        """The queue bound: an idle worker takes a request even with max_queue 0."""
        return len(self.queue) < self.config.max_queue or self.worker.free_slots > 0

    def remove(self, generation: Generation) -> bool:
        try:
            self.queue.remove(generation)
            return True
        except ValueError:
            return False

    def describe(self, now: float) -> dict[str, Any]:
        refusal = self.refusal
        return {
            "name": self.name,
            "kind": self.config.kind,
            "priority": self.config.priority,
            "standby": self.config.standby,
            "model": self.model_path,
            "available": refusal is None,  # takes traffic (HTTP's /v1/models lists only these)
            "state": refusal[0] if refusal else self.worker.state.value,
            "reason": refusal[1] if refusal else self.worker.reason,
            "circuit": self.circuit.value,
            "queue_depth": len(self.queue),
            "max_queue": self.config.max_queue,
            "in_flight": self.in_flight(),
            "slots": self.worker.slots,
            "capabilities": None if self.capabilities is None else sorted(self.capabilities),
            "served": self.stats.served,
            "cancelled": self.stats.finished.get(FINISH_CANCELLED, 0),  # of served: by the client, or it went away
            "failed": self.stats.failed,
            **self.stats.describe(self.config),
            "latency": self.latency.summary(now),
            "slo": {"ttft_ms": self.config.slo_ttft_ms, "per_token_ms": self.config.slo_per_token_ms},
            "residency": self.describe_residency(now),
        }

    def describe_residency(self, now: float) -> dict[str, Any]:
        return describe_residency(self, now)


class Engines(Residencies, Rooms):
    """All engines, and the decision to start or stop their workers.

    Callers say what they need ("a request is waiting here"); whether that
    means starting a process, waiting for a backoff or for GPU memory, or
    nothing at all, is decided here and nowhere else.
    """

    def __init__(self, engines: dict[str, EngineState], effects: Effects, gpu: GpuConfig | None = None) -> None:
        self.by_name = engines
        self.effects = effects
        self.gpu = gpu or GpuConfig()  # the minimum residency and the "wait" bound
        self.stopping = False
        self.refused_unrouted: dict[str, int] = {}  # generate ops refused before an engine was known, by code
        self._gpu_waiting: set[str] = set()  # GPU engines waiting for another's memory
        # The router fails an engine's queue that no GPU can take (on_no_room "fail", or "wait" run out).
        self.on_no_room: Callable[[EngineState, str, str, float], None] = lambda *_: None

    def __iter__(self) -> Iterator[EngineState]:
        return iter(self.by_name.values())

    def __getitem__(self, name: str) -> EngineState:
        return self.by_name[name]

    def get(self, name: str | None) -> EngineState | None:
        return self.by_name.get(name or "")

    def by_priority(self) -> list[EngineState]:
        return sorted(self.by_name.values(), key=lambda e: e.config.priority)

    @property
    def serving(self) -> bool:
        """Some engine can take a request now (a worker ready, or a cold standby that may start)."""
        return not self.stopping and any(e.healthy for e in self)

    def phase(self) -> str:
        """The daemon's phase once it has engines: serving, loading (workers starting), or why not."""
        if self.stopping:
            return "stopping"
        if self.serving:
            return "serving"
        if any(e.refusal is None and e.worker.state in (WorkerState.SPAWNING, WorkerState.LOADING) for e in self):
            return "loading"
        return "no engine can serve"

    def count_refusal(self, engine: EngineState | None, code: str) -> None:
        if engine is not None:
            engine.stats.record_refusal(code)
        else:
            self.refused_unrouted[code] = self.refused_unrouted.get(code, 0) + 1

    def add(self, engine: EngineState) -> EngineState:
        self.by_name[engine.name] = engine
        return engine

    def owning(self, worker_id: str) -> EngineState | None:
        """The engine whose live worker has this id."""
        return next((e for e in self if e.worker.worker_id == worker_id and e.worker.alive), None)

    def ensure_running(self, engine: EngineState, reason: str, now: float, load_reason: str = "demand") -> None:
        """Work is waiting on ``engine``: start its worker if none is running or due."""
        if engine.worker.state is WorkerState.STOPPED and engine.refusal is None:
            self.start(engine, reason, now, load_reason)

    def start(self, engine: EngineState, reason: str, now: float, load_reason: str = "demand") -> None:
        """Start the engine's worker, first making room on the GPU if it needs one."""
        worker = engine.worker
        if worker.alive or self.stopping or engine.retired:
            return
        if not self._plan(engine, now):
            return
        if not self._make_room(engine, now):
            return
        self._gpu_waiting.discard(engine.name)
        res = engine.residency
        res.waiting = res.wait_until = res.unload_reason = res.last_used_at = None
        res.load_reason = load_reason
        res.count_load(load_reason)
        worker_id = worker.begin(now)
        worker.transition(WorkerState.SPAWNING, reason)
        devices, shares = launch_devices(engine)
        res.devices, res.shares = devices, shares
        self.effects.start_worker(
            WorkerLaunch(engine.name, engine.config.kind, engine.config.env_name, worker_id, devices or None)
        )
        self.effects.publish(
            TOPIC_ENGINE_LOAD,
            engine=engine.name,
            worker_id=worker_id,
            reason=load_reason,
            device=devices[0] if devices else None,
            devices=list(devices),
            device_mib=[share >> 20 for share in shares],
        )

    def _plan(self, engine: EngineState, now: float) -> bool:
        """Plan the load against the GPU as it is now; False when nothing can be loaded."""
        plan = self.effects.plan_load(engine.name, engine.plan, engine.oom_step)
        after_oom, engine.oom_step = engine.oom_step, False
        if plan is None:
            return True
        engine.plan = plan
        chosen, detail = engine.chosen, plan.engines[0]
        log.info(
            "load planned",
            engine=engine.name,
            chosen=_describe(chosen),
            reasons=list(detail.reasons),
            warnings=list(detail.warnings),
        )
        self.effects.publish(
            TOPIC_ENGINE_PLAN,
            engine=engine.name,
            chosen=_describe(chosen),
            reasons=list(detail.reasons),
            warnings=list(detail.warnings),
            after_oom=after_oom,
        )
        if chosen is not None:
            return True
        reason = "; ".join(detail.reasons) or "no variant fits this node"
        engine.hard_failure = (ErrorCode.ENGINE_UNAVAILABLE, f"nothing to load: {reason}")
        if engine.worker.state is not WorkerState.FAILED:
            engine.worker.transition(WorkerState.FAILED, f"nothing to load: {reason}")
        return False

    @staticmethod
    def is_draining(engine: EngineState) -> bool:
        """A reload keeps the engine's worker from taking requests (its load changed, or it was removed)."""
        return engine.reload_pending or engine.retired

    def drain(self, engine: EngineState, now: float) -> None:
        """Stop a draining engine's worker as soon as it runs nothing (a planned unload); the engine is
        restarted or dropped once the worker has gone."""
        if self.is_draining(engine) and not engine.worker.running:
            self.unload(engine, "reload", now, "configuration reloaded")
            self.stop(engine, "configuration reloaded", now)
            if not engine.worker.alive:
                self.drained(engine, now)

    def drained(self, engine: EngineState, now: float) -> None:
        """The worker a reload waited for has gone (stopped, or crashed while draining)."""
        if engine.retired:
            if not engine.worker.alive:
                del self.by_name[engine.name]
                self._gpu_waiting.discard(engine.name)
            return
        engine.reload_pending = False
        if engine.worker.state is WorkerState.STOPPED and (engine.config.standby == "warm" or engine.queue):
            self.ensure_running(engine, "configuration reloaded", now)

    def stop(self, engine: EngineState, reason: str, now: float) -> None:
        """Ask the worker to exit; the supervisor escalates if it lingers."""
        worker = engine.worker
        if worker.state in (WorkerState.SPAWNING, WorkerState.LOADING, WorkerState.READY):
            worker.transition(WorkerState.STOPPING, reason)
            worker.times.stop_requested_at = now
            self.effects.stop_worker(worker.worker_id, connected=worker.connected)
        elif worker.state in (WorkerState.BACKOFF, WorkerState.FAILED):
            worker.transition(WorkerState.STOPPED, reason)
