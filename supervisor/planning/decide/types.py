"""The planner's vocabulary: what an engine asks for, what a device offers, each
candidate weighed and the plan that comes out.  Pure data, shared by the ladder
(search.py), its explanation (explain.py), the planner (plan.py), the core that
keeps an engine's plan in force, and the commands that print one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

MIB = 1 << 20
# The planner's KV cache names are llama.cpp's; the ExLlamaV2 worker calls them so.
EXL2_CACHE_NAMES = {"f16": "fp16", "q8_0": "q8", "q4_0": "q4"}
OOM_MIN_STEP = 0.05  # after an out-of-memory load, the next try needs at least this much less


class FactsLike(Protocol):
    """What the planner reads of planning.measure.model_facts.ModelFacts."""

    path: str
    format: str
    n_layer: int


class EstimateLike(Protocol):
    """What the planner reads of estimate.MemoryEstimate."""

    @property
    def gpu_bytes(self) -> int: ...

    @property
    def ram_bytes(self) -> int: ...


@dataclass(frozen=True)
class Estimators:
    """The estimate functions: planning/decide/estimate.py's, or a test's stand-ins.

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
    split: bool = False  # may be split across GPUs when it fits whole on no single one (config split = "auto")


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
    devices: tuple[int, ...] = ()  # split across these GPUs (the worker sees them in this order); (): one device
    device_bytes: tuple[int, ...] = ()  # the GPU memory planned on each of ``devices``

    @property
    def key(self) -> tuple[int, int, int, str]:
        return (self.variant, self.n_gpu_layers, self.n_ctx, self.cache_type)

    @property
    def layers_text(self) -> str:
        if self.n_gpu_layers < 0 or self.n_gpu_layers >= self.total_layers:
            return "all"
        return "0" if self.n_gpu_layers == 0 else f"{self.n_gpu_layers}/{self.total_layers}"

    @property
    def where(self) -> str:
        """The device(s) in a few words: "CPU", "GPU 1", "GPUs 0+1"."""
        if self.device is None:
            return "CPU"
        return f"GPUs {'+'.join(str(d) for d in self.devices)}" if self.devices else f"GPU {self.device}"


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

    snapshot: Any  # measure.gpu.GpuSnapshot: devices (index, name, total/free bytes, processes), reason
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
