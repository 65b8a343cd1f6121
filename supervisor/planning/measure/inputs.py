"""Planning a load: the GPU as the probe sees it now, each model variant's facts
as read from disk, and the pure planner (planning/decide/plan.py) deciding.

Used by the daemon before every worker start (through Effects.plan_load) and by
`node-supervisor plan`.  Facts are cached by file identity, so a restart does
not read a multi-GB header again; the probe is asked afresh for every plan (a
neighbour may have grown since the last start).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import psutil

from ...config import EngineConfig, Settings
from ...core.placement import GpuRoom
from ..decide.estimate import estimate_exl2, estimate_llamacpp
from ..decide.plan import engine_request, make_plan, plan_again, replan_after_oom
from ..decide.types import EngineRequest, Estimators, GpuPolicy, Plan, PlanInputs
from .gpu import GpuSnapshot, probe
from .model_facts import ModelFactsError, read_model_facts
from ...node.models import model_variants_for

ESTIMATORS = Estimators(llamacpp=estimate_llamacpp, exl2=estimate_exl2)
PLANNED_KINDS = ("llamacpp", "exllamav2")  # engines whose models have facts to plan with
STATUS_SNAPSHOT_AGE_S = 1.0  # status may show a probe this old: NVML is cheap, but not free per status call


class Planning:
    def __init__(self, settings: Settings, probe_gpus: Callable[[], GpuSnapshot] = probe) -> None:
        self.settings = settings
        self._probe = probe_gpus
        self._facts: dict[tuple[str, int, int], Any] = {}
        self._snapshot: GpuSnapshot | None = None
        self._snapshot_at = float("-inf")

    def snapshot(self, max_age_s: float = 0.0) -> GpuSnapshot:
        """The GPUs now, or, for status, as seen by status at most ``max_age_s`` ago (a plan's
        snapshot is never reused: it was taken before the worker it planned for had loaded)."""
        now = time.monotonic()
        if max_age_s <= 0:
            return self._probe()
        if self._snapshot is None or now - self._snapshot_at > max_age_s:
            self._snapshot, self._snapshot_at = self._probe(), now
        return self._snapshot

    def room(self) -> GpuRoom | None:
        """The GPUs measured now, for placing a load (core/placement.py)."""
        return gpu_room(self.snapshot(), GpuPolicy.from_config(self.settings.gpu))

    def request(self, name: str, config: EngineConfig, own_pids: frozenset[int] = frozenset()) -> EngineRequest:
        """The engine's request to the planner, with each variant's facts; unreadable variants become notes."""
        facts, notes = [], []
        for path in model_variants_for(self.settings, config):
            try:
                facts.append(self._read(path))
            except (ModelFactsError, OSError, ValueError) as exc:
                notes.append(f"variant {path} skipped: {exc}")
        return engine_request(name, config, facts, self.settings.gpu.min_ctx, own_pids, notes)

    def facts(self, path: Path) -> Any:
        """A model file's facts as planning reads them (cached by file), for what the daemon says of its
        models (the ps op); None when the file cannot be read (the engine's own state says why)."""
        try:
            return self._read(path)
        except (ModelFactsError, OSError, ValueError):
            return None

    def _read(self, path: Path) -> Any:
        """Facts of one variant, read again only when the file changed (the reader says what is wrong)."""
        try:
            stat = path.stat()
        except OSError:
            return read_model_facts(path)
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._facts:
            self._facts[key] = read_model_facts(path)
        return self._facts[key]

    def plan_load(self, engine: Any, previous: Plan | None, after_oom: bool, own_pids: frozenset[int]) -> Plan | None:
        """The next load of ``engine`` (core EngineState); None when it is not planned."""
        config = engine.config
        if config.kind not in PLANNED_KINDS:
            return None
        request = self.request(engine.name, config, own_pids)
        if not request.variants:
            return None  # no model facts: the worker loads as configured and reports what is wrong
        snapshot = self.snapshot()
        if previous is not None and after_oom:
            return replan_after_oom(previous, engine.name, snapshot)
        if previous is not None:
            return plan_again(previous, snapshot, request)  # earlier out-of-memory choices stay excluded
        policy = GpuPolicy.from_config(self.settings.gpu)
        return make_plan(PlanInputs(snapshot, (request,), policy, ESTIMATORS, psutil.virtual_memory().available))


def gpu_room(snapshot: GpuSnapshot, policy: GpuPolicy) -> GpuRoom | None:
    """What placement needs of a snapshot: room per device after the reserve, NVML's bytes per process."""
    if not snapshot.devices:
        return None
    used: dict[int, dict[int, int]] = {}
    for device in snapshot.devices:
        for process in device.processes:
            used.setdefault(process.pid, {})[device.index] = process.used_bytes or 0
    available = {d.index: max(0, d.free_bytes - policy.reserve_on(d.total_bytes)) for d in snapshot.devices}
    short = {d.index: max(0, policy.reserve_on(d.total_bytes) - d.free_bytes) for d in snapshot.devices}
    return GpuRoom(available, used, short)


def worker_gpu_bytes(snapshot: GpuSnapshot, pid: int | None) -> int | None:
    """GPU memory a process holds across devices, as NVML reports it; None without a GPU or pid."""
    if pid is None or not snapshot.devices:
        return None
    return sum(p.used_bytes or 0 for d in snapshot.devices for p in d.processes if p.pid == pid)
