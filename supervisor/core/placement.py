"""Many models on one node: where a load goes, which idle models make room for it,
and when an idle model is unloaded.  Pure: the GPU as measured comes in as a
:class:`GpuRoom` (io measures it, like the planner's snapshot), time is an argument.

The engine starter (core/engines.py) asks :func:`place` before every load of a
GPU engine; it acts on the answer (load on that device, evict these first, or
the engine's ``on_no_room``).  Models this daemon holds are counted by what
NVML measures their workers use, never by their estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..planning.decide.split import split_across
from .stats import Histogram

MIB = 1 << 20

# Why a model was loaded or unloaded (the engine.load / engine.unload events, the metrics' reason label).
LOAD_REASONS = ("demand", "requested", "warm", "restart")
UNLOAD_REASONS = ("idle", "evicted", "requested", "reload", "failed")
# Load-time histogram buckets (seconds): a small GGUF from the page cache to a large EXL2 from disk.
LOAD_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class GpuRoom:
    """The GPUs as measured now: what a new load may take on each device (free memory less
    the ``[gpu]`` reserve), and what each process of this daemon holds there (NVML per process)."""

    available: dict[int, int]  # device index -> bytes
    used_by_pid: dict[int, dict[int, int]] = field(default_factory=dict)  # pid -> device index -> bytes
    short: dict[int, int] = field(
        default_factory=dict
    )  # device -> bytes free memory is below the reserve (>0: squeezed)

    def held_by(self, pid: int | None) -> dict[int, int]:
        return dict(self.used_by_pid.get(pid, {})) if pid is not None else {}


@dataclass(frozen=True)
class Holder:
    """A loaded model of this daemon, as the placement sees it."""

    name: str
    held: dict[int, int]  # device index -> bytes measured
    last_used_at: float
    evictable: bool  # idle (nothing running or queued), not pinned, past the minimum residency


@dataclass(frozen=True)
class Placement:
    """The answer for one load: ``fit`` on ``devices``; ``evict`` these idle models from ``devices``
    first; or ``no_room`` (``free``: the most the devices offer, evicting what may be evicted).
    Several ``devices``: the model is split, ``shares`` bytes on each (the first: the roomiest)."""

    kind: Literal["fit", "evict", "no_room"]
    need: int
    devices: tuple[int, ...] = ()
    shares: tuple[int, ...] = ()
    victims: tuple[str, ...] = ()
    free: int = 0
    across: int = 1  # how many devices ``free`` is summed over

    @property
    def device(self) -> int | None:
        return self.devices[0] if self.devices else None

    def describe(self) -> str:
        where = f" across {self.across} GPUs" if self.across > 1 else ""
        return f"needs {self.need // MIB} MiB, {self.free // MIB} MiB free{where}"


def place(
    need: int,
    room: GpuRoom,
    holders: Sequence[Holder],
    devices: Sequence[int] | None = None,
    split: bool = False,
    per_device_overhead: int = 0,
) -> Placement:
    """Where a load of ``need`` bytes goes: the device with the most room that fits it as it is;
    else the device where evicting idle models, least recently used first, makes room with the
    fewest bytes evicted; else, with ``split``, across the fewest devices that hold it in
    proportion to their room (evicting the least recently used idle models there if need be);
    else no room.  ``devices``: only these (None: all)."""
    candidates = [d for d in room.available if devices is None or d in devices]
    if not candidates:
        return Placement("no_room", need)
    by_room = sorted(candidates, key=lambda d: (-room.available[d], d))
    best = by_room[0]
    if room.available[best] >= need:
        return Placement("fit", need, (best,), (need,), free=room.available[best])
    options: list[tuple[int, int, tuple[str, ...]]] = []
    most = room.available[best]
    for device in by_room:
        free, victims = room.available[device], []
        for holder in _by_age(holders):
            if free >= need:
                break
            if holder.evictable and holder.held.get(device, 0) > 0:
                free += holder.held[device]
                victims.append(holder.name)
        most = max(most, free)
        if free >= need:
            evicted = free - room.available[device]
            options.append((evicted, device, tuple(victims)))
    if options:
        _, device, victims = min(options)
        return Placement("evict", need, (device,), (need,), victims, free=room.available[device])
    if split and len(candidates) > 1:
        return _place_split(need, room, holders, candidates, per_device_overhead)
    return Placement("no_room", need, free=most)


def _by_age(holders: Sequence[Holder]) -> list[Holder]:
    return sorted(holders, key=lambda h: (h.last_used_at, h.name))


def _place_split(
    need: int, room: GpuRoom, holders: Sequence[Holder], candidates: Sequence[int], overhead: int
) -> Placement:
    """Across several devices: as they are, else after evicting idle models least recently used first
    (only those holding memory on the devices the split then uses are evicted)."""
    free = {d: room.available[d] for d in candidates}
    evicted: list[Holder] = []
    for holder in [None, *(h for h in _by_age(holders) if h.evictable)]:
        if holder is not None:
            if not any(holder.held.get(d, 0) > 0 for d in candidates):
                continue
            evicted.append(holder)
            for device in candidates:
                free[device] += holder.held.get(device, 0)
        chosen = split_across(need, free, overhead)
        if chosen is None:
            continue
        victims = tuple(h.name for h in evicted if any(h.held.get(d, 0) > 0 for d in chosen.devices))
        kind: Literal["fit", "evict"] = "evict" if victims else "fit"
        return Placement(
            kind,
            need,
            chosen.devices,
            chosen.shares,
            victims,
            sum(room.available[d] for d in chosen.devices),
            len(chosen.devices),
        )
    return Placement("no_room", need, free=sum(free.values()), across=len(candidates))


@dataclass
class Residency:
    """One engine's model on this node: when it was last used, how long it stays idle,
    why it is waiting for memory, and what its loads and unloads have been."""

    keep_alive_s: float  # -1: for ever
    last_used_at: float | None = None
    devices: tuple[int, ...] = ()  # the GPUs the current load was given (several: split); (): none, or not known
    shares: tuple[int, ...] = ()  # bytes planned on each of ``devices``
    waiting: str | None = None  # "waiting for GPU memory: needs X MiB, Y MiB free"
    wait_until: float | None = None  # the "wait" policy's bound
    unload_reason: str | None = None  # the stop in progress is an unload for this reason
    load_reason: str = "demand"
    loads: dict[str, int] = field(default_factory=dict)  # by reason
    unloads: dict[str, int] = field(default_factory=dict)  # by reason
    load_time: Histogram = field(default_factory=lambda: Histogram(LOAD_SECONDS_BUCKETS))  # start to ready

    def count_load(self, reason: str) -> None:
        self.loads[reason] = self.loads.get(reason, 0) + 1

    def count_unload(self, reason: str) -> None:
        self.unloads[reason] = self.unloads.get(reason, 0) + 1

    def record_load_time(self, seconds: float) -> None:
        self.load_time.observe(seconds)

    def unload_at(self, loaded_at: float | None) -> float | None:
        """When an idle model is due to go (None: never)."""
        since = self.last_used_at if self.last_used_at is not None else loaded_at
        if self.keep_alive_s < 0 or since is None:
            return None
        return since + self.keep_alive_s


def holder(engine: Any, room: GpuRoom, now: float, min_residency_s: float) -> Holder:
    """A loaded engine (core/engines.py EngineState) as the placement sees it: its memory as measured,
    evictable when idle with nothing queued, not pinned, and loaded at least ``min_residency_s`` ago."""
    worker = engine.worker
    ready_at = worker.times.ready_at or now
    evictable = worker.idle and not engine.queue and not engine.config.pinned and now - ready_at >= min_residency_s
    last_used = engine.residency.last_used_at
    return Holder(engine.name, room.held_by(worker.pid), last_used or ready_at, evictable)


def describe_residency(engine: Any, now: float) -> dict[str, Any]:
    """What `node-supervisor ps` shows of an engine: loaded or not, idle for, unload in, waiting for memory."""
    res, worker = engine.residency, engine.worker
    loaded = worker.state.value == "ready"
    unload_at = res.unload_at(worker.times.ready_at) if loaded and not worker.running and not engine.queue else None
    since = res.last_used_at if res.last_used_at is not None else worker.times.ready_at
    return {
        "loaded": loaded,
        "keep_alive_s": res.keep_alive_s,
        "pinned": engine.config.pinned,
        "exclusive": engine.config.exclusive,
        "on_no_room": engine.config.on_no_room,
        "device": res.devices[0] if res.devices else None,
        "devices": list(res.devices),
        "device_mib": [share >> 20 for share in res.shares],
        "idle_for_s": round(now - since, 1) if loaded and since is not None and not worker.running else None,
        "unload_in_s": None if unload_at is None else round(max(0.0, unload_at - now), 1),
        "waiting": res.waiting,
        "loads": dict(res.loads),
        "unloads": dict(res.unloads),
    }


def squeezed_devices(room: GpuRoom, our_pids: set[int]) -> dict[int, int]:
    """Devices where free memory has fallen below the ``[gpu]`` reserve while this daemon holds
    models there (a neighbour grew past what it was left): device -> bytes short.  Never a reason
    to kill anything: the caller logs and publishes it."""
    ours = {device for pid in our_pids for device in room.held_by(pid)}
    return {device: short for device, short in room.short.items() if short > 0 and device in ours}
