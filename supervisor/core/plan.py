"""GPU placement: which model variant, how many layers, what context and KV cache
type each engine gets on a GPU that the node's other services share.

Pure.  The GPU snapshot, the model facts and the memory estimate functions come
in as arguments (the daemon and ``node-supervisor plan`` pass the real ones,
tests pass recorded figures); a Plan comes out with a reason for each choice
and the table of every candidate considered, so an operator can see why.

Engines are planned one at a time against a whole device: the core never lets
two GPU engines of this daemon load at once (core/engines.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from ..config import KV_CACHE_TYPES

MIB = 1 << 20
# The planner's KV cache names are llama.cpp's; the ExLlamaV2 worker calls them so.
EXL2_CACHE_NAMES = {"f16": "fp16", "q8_0": "q8", "q4_0": "q4"}
OOM_MIN_STEP = 0.05  # after an out-of-memory load, the next try needs at least this much less


class FactsLike(Protocol):
    """What the planner reads of supervisor.model_facts.ModelFacts."""

    path: str
    format: str
    n_layer: int


class EstimateLike(Protocol):
    """What the planner reads of core.estimate.MemoryEstimate."""

    @property
    def gpu_bytes(self) -> int: ...

    @property
    def ram_bytes(self) -> int: ...


@dataclass(frozen=True)
class Estimators:
    """The estimate functions: core/estimate.py's, or a test's stand-ins.

    ``llamacpp(facts, n_gpu_layers=, n_ctx=, cache_type=, n_batch=, n_ubatch=)``
    and ``exl2(facts, n_ctx=, cache_type=)`` (ExLlamaV2's cache names).
    """

    llamacpp: Callable[..., EstimateLike]
    exl2: Callable[..., EstimateLike]


@dataclass(frozen=True)
class GpuPolicy:
    """How much of a device the planner may promise away (config's ``[gpu]``)."""

    reserve_bytes: int = 0
    reserve_percent: float = 0.0
    safety_margin: float = 0.10
    cuda_overhead_bytes: int = 600 * MIB

    @classmethod
    def from_config(cls, gpu: Any, reserve_mib: int | None = None) -> "GpuPolicy":
        """From config.GpuConfig (``reserve_mib`` overrides its own, as ``plan --reserve`` does)."""
        reserve = gpu.reserve_mib if reserve_mib is None else reserve_mib
        return cls(reserve * MIB, gpu.reserve_percent, gpu.safety_margin, gpu.cuda_overhead_mib * MIB)

    def reserve_on(self, total_bytes: int) -> int:
        """Held back for the node's other services, and the share left free."""
        return self.reserve_bytes + int(total_bytes * self.reserve_percent / 100)

    def needs(self, estimate_gpu_bytes: int) -> int:
        """GPU memory a load needs: the estimate, the margin on it, and the CUDA
        context a process costs on a device before its first buffer."""
        if estimate_gpu_bytes <= 0:
            return 0
        return int(estimate_gpu_bytes * (1 + self.safety_margin)) + self.cuda_overhead_bytes


@dataclass(frozen=True)
class EngineRequest:
    """What one engine asks for: its variants' facts (best first) and its config."""

    name: str
    variants: tuple[Any, ...]
    n_ctx: int
    min_ctx: int = 512
    n_gpu_layers: int | Literal["auto"] = "auto"
    cache_types: tuple[str, ...] = ("f16",)  # the configured one first, then smaller ones allowed
    own_pids: frozenset[int] = frozenset()  # this engine's running worker: its memory is its own
    n_batch: int = 512
    n_ubatch: int = 512
    notes: tuple[str, ...] = ()  # e.g. variants whose facts could not be read
    sequences: int = 1  # requests loaded together (llama.cpp's parallel): the KV cache holds n_ctx for each


@dataclass(frozen=True)
class DeviceBudget:
    """What one device offers one engine."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    own_bytes: int  # used by this engine's own worker: free again when it restarts
    reserve_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class Candidate:
    """One way to load an engine, what it needs and whether that fits."""

    step: str  # where on the ladder: "full", "smaller context", "partial", "cpu", ...
    variant: int  # index into the request's variants
    path: str
    n_gpu_layers: int  # -1: all; 0: none (llama.cpp counts the output layer as one more)
    total_layers: int
    n_ctx: int
    cache_type: str
    device: int | None
    gpu_bytes: int  # needed: estimate x (1 + margin) + CUDA overhead
    ram_bytes: int
    free_bytes: int | None  # available on the device after the reserve
    fits: bool
    verdict: str

    @property
    def key(self) -> tuple[int, int, int, str]:
        return (self.variant, self.n_gpu_layers, self.n_ctx, self.cache_type)

    @property
    def layers_text(self) -> str:
        if self.n_gpu_layers < 0 or self.n_gpu_layers >= self.total_layers:
            return "all"
        return "0" if self.n_gpu_layers == 0 else f"{self.n_gpu_layers}/{self.total_layers}"


@dataclass(frozen=True)
class EnginePlan:
    """The choice for one engine, why, and everything that was weighed."""

    engine: str
    chosen: Candidate | None
    reasons: tuple[str, ...]
    warnings: tuple[str, ...]
    candidates: tuple[Candidate, ...]
    device: DeviceBudget | None
    failed: tuple[Candidate, ...] = ()  # loads that ran out of GPU memory: never chosen again

    def to_dict(self) -> dict[str, Any]:
        def row(c: Candidate) -> dict[str, Any]:
            return {**c.__dict__, "layers": c.layers_text}

        return {
            "engine": self.engine,
            "chosen": row(self.chosen) if self.chosen else None,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "device": dict(self.device.__dict__) if self.device else None,
            "candidates": [row(c) for c in self.candidates],
            "failed": [row(c) for c in self.failed],
        }


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan is made of, kept so that a replan can start from it."""

    snapshot: Any  # gpu_probe.GpuSnapshot: devices (index, name, total/free bytes, processes), reason
    requests: tuple[EngineRequest, ...]
    policy: GpuPolicy
    estimators: Estimators
    ram_available_bytes: int | None = None


@dataclass(frozen=True)
class Plan:
    engines: tuple[EnginePlan, ...]
    gpu_reason: str  # the probe's word on the GPUs (why there are none, if so)
    inputs: PlanInputs

    def engine(self, name: str) -> EnginePlan:
        return next(e for e in self.engines if e.engine == name)


def cache_ladder(configured: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """The configured KV cache type, then each smaller one the engine allows."""
    rank = KV_CACHE_TYPES.index
    return (configured, *(t for t in KV_CACHE_TYPES if t in allowed and rank(t) > rank(configured)))


def engine_request(name: str, config: Any, variants: Sequence[Any], min_ctx: int, own_pids: frozenset[int] = frozenset(), notes: Sequence[str] = ()) -> EngineRequest:
    """What an engine's config (config.EngineConfig) asks of the planner.

    llama.cpp's batch sizes as the worker sets them: the key, else its options,
    else 512.  Where the worker's default batch is larger (2048 with layers on
    a GPU), the micro-batch, min(n_ubatch, n_batch), and so the estimate, are the same.
    """
    batch, ubatch = (int(_first_set(getattr(config, key, None), config.options.get(key), 512)) for key in ("n_batch", "n_ubatch"))
    cache_types = cache_ladder(config.cache_type, config.cache_types_allowed)
    return EngineRequest(name, tuple(variants), config.n_ctx, min_ctx, config.n_gpu_layers, cache_types, frozenset(own_pids), batch, ubatch, tuple(notes),
                         sequences=config.parallel if config.kind == "llamacpp" else 1)  # fmt: skip


def _first_set(*values: Any) -> Any:
    return next(value for value in values if value is not None)


def make_plan(inputs: PlanInputs) -> Plan:
    """Plan every requested engine."""
    engines = tuple(_plan_engine(request, inputs, ()) for request in inputs.requests)
    return Plan(engines, inputs.snapshot.reason, inputs)


def plan(snapshot: Any, requests: Sequence[EngineRequest], policy: GpuPolicy, estimators: Estimators, ram_available_bytes: int | None = None) -> Plan:
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
    # The ladder and its explanation use this module's types: imported here, not at the top.
    from .plan_explain import explain
    from .plan_search import Search

    budget = best_device(inputs.snapshot, request, inputs.policy)
    search = Search(request, inputs, budget, failed)
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
