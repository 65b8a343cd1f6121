"""Residency: the load op, the unload op and the idle unload after keep_alive, as a part of
:class:`core.engines.Engines` (the one place that starts and stops workers).  Pure."""

from __future__ import annotations

from typing import Any

from ..logs import get_logger
from .effects import TOPIC_ENGINE_UNLOAD, TOPIC_GPU_PRESSURE
from .lifecycle import WorkerState
from .placement import squeezed_devices

PRESSURE_CHECK_S = 10.0  # how often the GPUs are measured for a neighbour that grew, while models are loaded

log = get_logger("supervisor.engines")


class Residencies:
    """Engines' methods that load and unload models on request or when idle (a mixin of Engines)."""

    effects: Any
    stop: Any
    ensure_running: Any
    _pressure_at: float = float("-inf")
    _squeezed: frozenset[int] = frozenset()

    def check_neighbours(self, now: float) -> None:
        """Every PRESSURE_CHECK_S while models hold GPU memory: a device whose free memory fell below the
        reserve is logged and published once (a neighbour grew past its share); nothing is killed."""
        pids = {e.worker.pid for e in self if e.worker.alive and e.uses_gpu}  # type: ignore[attr-defined]
        pids.discard(None)
        if not pids or now - self._pressure_at < PRESSURE_CHECK_S:
            return
        self._pressure_at = now
        room = self.effects.gpu_room()
        squeezed = squeezed_devices(room, pids) if room is not None else {}
        for device, short in squeezed.items():
            if device not in self._squeezed:
                free = room.available.get(device, 0)
                log.warning("a neighbour took GPU memory past the reserve", device=device, short_mib=short >> 20)
                self.effects.publish(TOPIC_GPU_PRESSURE, device=device, short_mib=short >> 20, available_mib=free >> 20)
        self._squeezed = frozenset(squeezed)

    # --- idle unload -----------------------------------------------------------------

    def used(self, engine: Any, now: float) -> None:
        """A request of ``engine`` ended: its idle time starts now."""
        engine.residency.last_used_at = now
        self.unload_if_idle(engine, now)

    def unload_if_idle(self, engine: Any, now: float) -> None:
        """An idle model past its keep_alive, or one asked to go, is unloaded (a planned stop)."""
        worker, res = engine.worker, engine.residency
        if worker.state is not WorkerState.READY or worker.running or engine.queue or engine.reload_pending:
            return
        if res.unload_reason is not None:
            self.unload(engine, res.unload_reason, now)
            return
        unload_at = res.unload_at(worker.times.ready_at)
        if unload_at is None:
            return
        if now >= unload_at:
            self.unload(engine, "idle", now, f"idle for {res.keep_alive_s:g}s (keep_alive)")
        else:
            self.effects.wake_at(unload_at)

    def unload(self, engine: Any, reason: str, now: float, detail: str | None = None) -> None:
        """Stop a loaded model on purpose: no restart, no backoff, no circuit count."""
        worker = engine.worker
        if not worker.alive or worker.state is WorkerState.STOPPING:
            return
        engine.residency.unload_reason = None
        engine.residency.count_unload(reason)
        if reason != "reload":
            engine.on_demand = True
        detail = detail or f"unloaded ({reason})"
        worker_id = worker.worker_id
        self.stop(engine, detail, now)
        self.effects.publish(TOPIC_ENGINE_UNLOAD, engine=engine.name, worker_id=worker_id, reason=reason, detail=detail)

    def request_load(self, engine: Any, keep_alive: float | None, now: float) -> str:
        """The load op: load now if it is not loaded; its keep_alive counts from now.  The state after."""
        res = engine.residency
        res.keep_alive_s = engine.config.keep_alive_s if keep_alive is None else keep_alive
        res.unload_reason = None
        if engine.worker.state is WorkerState.READY:
            res.last_used_at = now
            self.unload_if_idle(engine, now)
        else:
            self.ensure_running(engine, "load op", now, "requested")
        return "waiting" if res.waiting and not engine.worker.alive else engine.worker.state.value

    def request_unload(self, engine: Any, now: float) -> None:
        """The unload op: now if nothing runs or waits; else once its requests have finished."""
        if engine.worker.state in (WorkerState.SPAWNING, WorkerState.LOADING) and not engine.queue:
            self.unload(engine, "requested", now)
            return
        if engine.worker.alive:
            engine.residency.unload_reason = "requested"
            self.unload_if_idle(engine, now)
