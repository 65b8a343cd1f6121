"""GPU placement: which model variant, how many layers, what context and KV cache
type each engine gets on a GPU that the node's other services share.

Pure.  The GPU snapshot, the model facts and the memory estimate functions come
in as arguments (the daemon and ``node-supervisor plan`` pass the real ones,
tests pass recorded figures); a Plan comes out with a reason for each choice
and the table of every candidate considered, so an operator can see why.

Engines are planned one at a time against the devices as measured: the core never
lets two loads of this daemon run at once on one device (core/engines.py).  A model
is planned on the device with the most room; where it fits whole on none, and its
engine allows it (``split = "auto"``), across several (split.py), before any smaller
load is considered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ...config import KV_CACHE_TYPES
from .explain import explain
from .search import Search
from .types import Candidate, DeviceBudget, EnginePlan, EngineRequest, Estimators, GpuPolicy, Plan, PlanInputs


def cache_ladder(configured: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """The configured KV cache type, then each smaller one the engine allows."""
    rank = KV_CACHE_TYPES.index
    return (configured, *(t for t in KV_CACHE_TYPES if t in allowed and rank(t) > rank(configured)))


def engine_request(
    name: str,
    config: Any,
    variants: Sequence[Any],
    min_ctx: int,
    own_pids: frozenset[int] = frozenset(),
    notes: Sequence[str] = (),
) -> EngineRequest:
    """What an engine's config (config.EngineConfig) asks of the planner.

    llama.cpp's batch sizes as the worker sets them: the key, else its options,
    else 512.  Where the worker's default batch is larger (2048 with layers on
    a GPU), the micro-batch, min(n_ubatch, n_batch), and so the estimate, are the same.
    """
    batch, ubatch = (
        int(_first_set(getattr(config, key, None), config.options.get(key), 512)) for key in ("n_batch", "n_ubatch")
    )
    cache_types = cache_ladder(config.cache_type, config.cache_types_allowed)
    return EngineRequest(
        name,
        tuple(variants),
        config.n_ctx,
        min_ctx,
        config.n_gpu_layers,
        cache_types,
        frozenset(own_pids),
        batch,
        ubatch,
        tuple(notes),
        sequences=config.parallel if config.kind == "llamacpp" else 1,
        split=getattr(config, "split", "never") == "auto",
    )


def _first_set(*values: Any) -> Any:
    return next(value for value in values if value is not None)


def make_plan(inputs: PlanInputs) -> Plan:
    """Plan every requested engine."""
    engines = tuple(_plan_engine(request, inputs, ()) for request in inputs.requests)
    return Plan(engines, inputs.snapshot.reason, inputs)


def plan(
    snapshot: Any,
    requests: Sequence[EngineRequest],
    policy: GpuPolicy,
    estimators: Estimators,
    ram_available_bytes: int | None = None,
) -> Plan:
    return make_plan(PlanInputs(snapshot, tuple(requests), policy, estimators, ram_available_bytes))


def replan_after_oom(previous: Plan, engine: str, snapshot: Any = None) -> Plan:
    """The engine's load ran out of GPU memory: move to a smaller candidate.

    The failed candidate joins the engine's ``failed`` list; the new choice must
    need at least ``max(safety_margin, 5 %)`` less GPU memory than the smallest
    failure (so the estimate's error is not met again by a near twin), and never
    repeats one.  With nothing smaller on the GPU it is the CPU, then nothing.
    A fresh ``snapshot`` (taken after the failed worker exited) may be given.
    """
    old = previous.engine(engine)
    failed = old.failed + ((old.chosen,) if old.chosen else ())
    inputs = replace(previous.inputs, snapshot=snapshot) if snapshot is not None else previous.inputs
    request = next(r for r in inputs.requests if r.name == engine)
    new = _plan_engine(request, inputs, failed)
    engines = tuple(new if e.engine == engine else e for e in previous.engines)
    return Plan(engines, inputs.snapshot.reason, inputs)


def plan_again(previous: Plan, snapshot: Any, request: EngineRequest) -> Plan:
    """A restart: plan the engine afresh against ``snapshot`` (a neighbour may have grown
    or shrunk), keeping every choice that ran out of GPU memory excluded."""
    old = previous.engine(request.name)
    inputs = replace(previous.inputs, snapshot=snapshot, requests=(request,))
    return Plan((_plan_engine(request, inputs, old.failed),), snapshot.reason, inputs)


def _plan_engine(request: EngineRequest, inputs: PlanInputs, failed: tuple[Candidate, ...]) -> EnginePlan:
    budgets = [device_budget(device, request.own_pids, inputs.policy) for device in inputs.snapshot.devices]
    budget = max(budgets, key=lambda b: (b.available_bytes, -b.index), default=None)
    search = Search(request, inputs, budget, failed, {b.index: b.available_bytes for b in budgets})
    chosen = search.run()
    reasons, warnings = explain(search, chosen)
    return EnginePlan(request.name, chosen, reasons, warnings, tuple(search.rows), budget, failed)


def best_device(snapshot: Any, request: EngineRequest, policy: GpuPolicy) -> DeviceBudget | None:
    """The device with the most memory available to this engine (ties: the lowest index)."""
    budgets = [device_budget(device, request.own_pids, policy) for device in snapshot.devices]
    return max(budgets, key=lambda b: (b.available_bytes, -b.index), default=None)


def device_budget(device: Any, own_pids: frozenset[int], policy: GpuPolicy) -> DeviceBudget:
    """Free memory, plus what this engine's own worker holds (a restart of that worker
    gets it back; a neighbour's memory never counts), less the reserve."""
    own = sum(p.used_bytes or 0 for p in device.processes if p.pid in own_pids)
    reserve = policy.reserve_on(device.total_bytes)
    available = max(0, device.free_bytes + own - reserve)
    return DeviceBudget(device.index, device.name, device.total_bytes, device.free_bytes, own, reserve, available)
