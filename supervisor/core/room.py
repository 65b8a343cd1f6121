"""Room on the GPUs for a load, as a part of :class:`core.engines.Engines`: where the load
goes (one device, or split across several), which idle models are evicted first, the
engine's ``on_no_room``, and loads serialized per device.  Pure.

Loads are serialized per GPU, not node-wide: while a worker loads or unloads on a
device its memory there is not yet what NVML says, so no other load is placed on that
device until it is done (a split load holds all its devices).  Loads on other devices
go ahead at once, and CPU-only loads never wait for a GPU.
"""

from __future__ import annotations

from typing import Any

from workers.protocol import ErrorCode

from ..logs import get_logger
from .lifecycle import WorkerState
from .placement import GpuRoom, Placement, place
from .placement import holder as as_holder

MIB = 1 << 20

log = get_logger("supervisor.engines")


class Rooms:
    """Engines' methods that make room on the GPUs for a load (a mixin of Engines)."""

    effects: Any
    gpu: Any
    by_name: dict[str, Any]
    on_no_room: Any
    unload: Any
    ensure_running: Any
    _gpu_waiting: set[str]

    def _make_room(self, engine: Any, now: float) -> bool:
        """True: load now (on ``engine.residency.devices`` where the placement chose them).  False: the
        engine waits (a load or unload under way on the devices it could use, evictions under way, the
        "wait" policy) or its queue was refused (no room, "fail")."""
        res = engine.residency
        res.devices, res.shares = (), ()
        others = [e for e in self if e is not engine and e.uses_gpu and e.worker.alive]  # type: ignore[attr-defined]
        if engine.uses_gpu and (engine.config.exclusive or any(e.config.exclusive for e in others)):
            if not others:
                return True
            # One GPU engine at a time: wait until the others have exited and their memory is released.
            self._wait(engine, f"waiting for {', '.join(e.name for e in others)} to leave the GPU (exclusive)")
            for holder in others:
                self.unload(holder, "evicted", now, f"making room on the GPU for {engine.name}")
            return False
        if not engine.config.uses_gpu:
            return True
        room: GpuRoom | None = self.effects.gpu_room()
        need = engine.gpu_need()
        if room is None or not room.available or need is None:
            return True  # no GPU to place on, or nothing known to place: it loads as planned or configured
        moving = [e for e in others if e.worker.state is not WorkerState.READY]
        busy = {device for e in moving for device in (e.residency.devices or room.available)}
        holders = [as_holder(e, room, now, self.gpu.min_residency_s) for e in others]
        split = engine.config.split == "auto"
        overhead = self.gpu.cuda_overhead_mib * MIB
        placement = place(need, room, holders, [d for d in room.available if d not in busy], split, overhead)
        if placement.kind == "fit":
            res.devices, res.shares = placement.devices, placement.shares
            return True
        if moving:
            # Two loads at once on a device is how VRAM runs out, and memory being released is not yet
            # measured: what needs the busy devices (or an eviction) waits until they are done.
            self._wait(engine, f"waiting for {', '.join(e.name for e in moving)} to finish loading or unloading")
            return False
        if placement.kind == "evict":
            self._wait(engine, f"evicting {', '.join(placement.victims)} to make room: {placement.describe()}")
            for name in placement.victims:
                self.unload(self.by_name[name], "evicted", now, f"making room on the GPU for {engine.name}")
            return False
        return self._no_room(engine, placement, now)

    def _no_room(self, engine: Any, placement: Placement, now: float) -> bool:
        """Nothing fits even after evicting what may be evicted: the engine's ``on_no_room``."""
        policy, res = engine.config.on_no_room, engine.residency
        if policy == "step_down" and engine.plan is not None and engine.chosen is not None:
            return True  # the plan stepped down the ladder against the GPU as it is
        if policy in ("wait", "step_down"):  # step_down with no ladder (no model facts): wait
            if res.wait_until is None:
                res.wait_until = now + self.gpu.no_room_wait_s
                self.effects.wake_at(res.wait_until)
            if now < res.wait_until:
                self._wait(engine, f"waiting for GPU memory: {placement.describe()}")
                return False
            message = f"no GPU memory after waiting {self.gpu.no_room_wait_s:g}s: {placement.describe()}"
        else:
            message = f"not enough GPU memory for {engine.name}: {placement.describe()}"
        self._gpu_waiting.discard(engine.name)
        res.waiting = res.wait_until = None
        log.warning("no room on the GPU", engine=engine.name, detail=message)
        self.on_no_room(engine, ErrorCode.INSUFFICIENT_MEMORY, message, now)
        return False

    def _wait(self, engine: Any, why: str) -> None:
        if engine.residency.waiting != why:
            log.info("load waits", engine=engine.name, reason=why)
        engine.residency.waiting = why
        self._gpu_waiting.add(engine.name)

    def retry_waiting(self, now: float) -> None:
        """Engines waiting for memory look again (the "wait" policy's bound is checked there too)."""
        for name in list(self._gpu_waiting):
            engine = self.by_name.get(name)
            if engine is not None and engine.residency.wait_until is not None:
                self.ensure_running(engine, "GPU memory may be free", now)

    def gpu_released(self, now: float) -> None:
        """A load finished or a worker exited: the loads waiting for its devices may go."""
        for name in list(self._gpu_waiting):
            if name in self.by_name:
                self.ensure_running(self.by_name[name], "GPU memory released", now)


def launch_devices(engine: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The GPUs a load starts on and the bytes planned on each: where the placement put it, else
    where the plan put it (one device, or a split), else none known (the worker sees the node's)."""
    res, chosen = engine.residency, engine.chosen
    if res.devices:
        return res.devices, res.shares
    if chosen is not None and chosen.n_gpu_layers != 0 and chosen.device is not None:
        return chosen.devices or (chosen.device,), chosen.device_bytes or (chosen.gpu_bytes,)
    return (), ()
