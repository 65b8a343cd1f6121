"""The planner's ladder for one engine.

Candidates are tried in the order of preference, each estimated and judged
against the device; the first that fits is chosen:

1. the best variant with every layer on the GPU at the requested context;
2. the same at smaller contexts: halving down to ``min_ctx``, then the largest
   context (a multiple of 256) between the first half that fits and the one
   above it, so no more context is given up than needed;
3. the same with each smaller KV cache type the engine allows;
4. the next variant, likewise;
4b. where the engine may be split (``split = "auto"``) and there are several GPUs:
   1-4 again, whole across the fewest devices that hold it (split.py);
5. the most layers of the best GGUF variant that fits in part (at the
   requested context and cache type);
6. the CPU (no layers), which always "fits": RAM is only warned about.

ExLlamaV2 variants load whole onto the GPU(s), so they skip 5 and 6.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from .split import Split, split_across
from .types import EXL2_CACHE_NAMES, MIB, OOM_MIN_STEP, Candidate, DeviceBudget, EngineRequest, GpuPolicy, PlanInputs

CTX_ALIGN = 256


def mib(n_bytes: int | None) -> str:
    return "-" if n_bytes is None else str(round(n_bytes / MIB))


def variant_name(path: str) -> str:
    """The file or directory name: what an operator recognises in a list of variants."""
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1] or path


def ctx_steps(n_ctx: int, min_ctx: int) -> list[int]:
    """The requested context, its halves while they stay above min_ctx, then min_ctx."""
    steps = [n_ctx]
    while steps[-1] // 2 >= min_ctx:
        steps.append(steps[-1] // 2)
    if steps[-1] > min_ctx:
        steps.append(min_ctx)
    return steps


def oom_cap(failed: tuple[Candidate, ...], policy: GpuPolicy) -> int | None:
    """After out-of-memory loads, the most a new GPU candidate may need."""
    needs = [c.gpu_bytes for c in failed if c.n_gpu_layers != 0]
    if not needs:
        return None
    return int(min(needs) * (1 - max(policy.safety_margin, OOM_MIN_STEP)))


def explicit_layers(request: EngineRequest) -> int | None:
    """The configured integer, kept exact; None when the planner chooses.  ExLlamaV2
    has no layer split: its engines are always planned."""
    if request.n_gpu_layers == "auto" or not request.variants or request.variants[0].format == "exl2":
        return None
    return int(request.n_gpu_layers)


class Search:
    """One engine's walk down the ladder; ``rows`` is the table of what was weighed."""

    def __init__(
        self,
        request: EngineRequest,
        inputs: PlanInputs,
        budget: DeviceBudget | None,
        failed: tuple[Candidate, ...],
        rooms: dict[int, int] | None = None,
    ) -> None:
        self.request, self.budget, self.failed = request, budget, failed
        self.rooms = rooms or {}  # device -> bytes available to this engine (for a split)
        self.splitting = False  # in the split pass of the ladder
        self.policy, self.estimators = inputs.policy, inputs.estimators
        self.ram_available, self.gpu_reason = inputs.ram_available_bytes, inputs.snapshot.reason
        self.device_count = len(inputs.snapshot.devices)
        self.failed_keys = {c.key for c in failed}
        self.cap = oom_cap(failed, inputs.policy)
        self.explicit = explicit_layers(request)
        self.rows: list[Candidate] = []

    def run(self) -> Candidate | None:
        if not self.request.variants:
            return None
        if self.explicit is not None:
            row = self.evaluate("explicit", 0, self.explicit, self.request.n_ctx, self.request.cache_types[0])
            return None if row.key in self.failed_keys else row
        if self.budget is not None:
            for index in range(len(self.request.variants)):
                if chosen := self._whole(index):
                    return chosen
            if self.request.split and len(self.rooms) > 1:
                self.splitting = True
                for index in range(len(self.request.variants)):
                    if chosen := self._whole(index):
                        return chosen
                self.splitting = False
            for index in self._gguf_variants():
                if chosen := self._partial(index):
                    return chosen
        return self._cpu()

    def _gguf_variants(self) -> list[int]:
        return [i for i, facts in enumerate(self.request.variants) if facts.format != "exl2"]

    def _whole(self, variant: int) -> Candidate | None:
        """Every layer on the GPU: each allowed cache type, each context step."""
        request = self.request
        for cache in request.cache_types:
            above: int | None = None
            for n_ctx in ctx_steps(request.n_ctx, request.min_ctx):
                row = self.evaluate(self._step(variant, n_ctx, cache), variant, -1, n_ctx, cache)
                if row.fits:
                    return self._widen(row, above) if above else row
                above = n_ctx
        return None

    def _step(self, variant: int, n_ctx: int, cache: str) -> str:
        parts = [
            "next variant" if variant else "",
            "smaller context" if n_ctx < self.request.n_ctx else "",
            "smaller cache" if cache != self.request.cache_types[0] else "",
        ]
        if self.splitting:
            return ", ".join(["split", *(p for p in parts if p)])
        return ", ".join(p for p in parts if p) or "requested"

    def _widen(self, row: Candidate, above: int) -> Candidate:
        """The largest aligned context between a half that fits and the step above it."""
        low, high, best = row.n_ctx, above, row
        while True:
            middle = (low + high) // 2 // CTX_ALIGN * CTX_ALIGN
            if middle <= low or middle >= high:
                break
            probe = self.evaluate(row.step, row.variant, -1, middle, row.cache_type, record=False)
            low, high, best = (middle, high, probe) if probe.fits else (low, middle, best)
        return row if best is row else self.record(replace(best, step=best.step + ", fitted"))

    def _partial(self, variant: int) -> Candidate | None:
        """The most layers that fit (the output layer counts as one more)."""
        n_ctx, cache = self.request.n_ctx, self.request.cache_types[0]
        probes = {1: self.evaluate("partial", variant, 1, n_ctx, cache, record=False)}
        if not probes[1].fits:
            self.record(probes[1])  # not even one layer: shown, so the table says why
            return None
        low, high = 1, self.request.variants[variant].n_layer + 1  # low fits; high is "all", which did not
        while high - low > 1:
            middle = (low + high) // 2
            probes[middle] = self.evaluate("partial", variant, middle, n_ctx, cache, record=False)
            low, high = (middle, high) if probes[middle].fits else (low, middle)
        chosen = self.record(probes[low])
        if high in probes:
            self.record(probes[high])  # one layer more: what it would have needed
        return chosen

    def _cpu(self) -> Candidate | None:
        index = next(iter(self._gguf_variants()), None)
        if index is None:
            return None
        row = self.evaluate("cpu", index, 0, self.request.n_ctx, self.request.cache_types[0])
        return row if row.fits else None

    def evaluate(self, step: str, variant: int, layers: int, n_ctx: int, cache: str, record: bool = True) -> Candidate:
        facts = self.request.variants[variant]
        gpu_estimate, ram = self._estimate(facts, layers, n_ctx, cache)
        need = self.policy.needs(gpu_estimate) if layers != 0 else 0
        key = (variant, layers, n_ctx, cache)
        fits, verdict = self._judge(key, layers, need)
        device = self.budget.index if self.budget is not None and layers != 0 else None
        free = self.budget.available_bytes if self.budget is not None else None
        split: Split | None = None
        if self.splitting and layers != 0:
            split = split_across(need, self.rooms, self.policy.cuda_overhead_bytes)
            free = sum(self.rooms.values())
            fits, verdict = self._judge_split(key, need, split, fits, verdict)
            device = split.devices[0] if split is not None else device
        row = Candidate(
            step,
            variant,
            str(facts.path),
            layers,
            facts.n_layer + 1,
            n_ctx,
            cache,
            device,
            need,
            ram,
            free,
            fits,
            verdict,
            split.devices if split is not None else (),
            split.shares if split is not None else (),
        )
        return self.record(row) if record else row

    def record(self, row: Candidate) -> Candidate:
        self.rows.append(row)
        return row

    def _estimate(self, facts: Any, layers: int, n_ctx: int, cache: str) -> tuple[int, int]:
        if facts.format == "exl2":
            estimate = self.estimators.exl2(facts, n_ctx=n_ctx, cache_type=EXL2_CACHE_NAMES.get(cache, cache))
        else:
            estimate = self.estimators.llamacpp(
                facts,
                n_gpu_layers=layers,
                n_ctx=n_ctx * self.request.sequences,
                cache_type=cache,
                n_batch=self.request.n_batch,
                n_ubatch=self.request.n_ubatch,
            )
        return int(estimate.gpu_bytes), int(estimate.ram_bytes)

    def _judge_split(
        self, key: tuple[int, int, int, str], need: int, split: Split | None, fits: bool, verdict: str
    ) -> tuple[bool, str]:
        """A split's verdict: as one device's where it failed for a reason of its own (out of memory
        before, over the limit), else whether the devices hold it together."""
        if key in self.failed_keys or (self.cap is not None and need > self.cap):
            return fits, verdict
        if split is None:
            return (
                False,
                f"{mib(need)} MiB does not fit across {len(self.rooms)} GPUs ({mib(sum(self.rooms.values()))} MiB)",
            )
        shares = " + ".join(f"{mib(b)} on GPU {d}" for d, b in zip(split.devices, split.shares))
        return True, f"fits split: {shares}"

    def _judge(self, key: tuple[int, int, int, str], layers: int, need: int) -> tuple[bool, str]:
        if key in self.failed_keys:
            return False, "ran out of GPU memory when loaded"
        if layers == 0:
            return True, "runs on the CPU"
        if self.budget is None:
            return False, f"no usable GPU: {self.gpu_reason}"
        available = self.budget.available_bytes
        if self.cap is not None and need > self.cap:
            return False, f"over the {mib(self.cap)} MiB limit after an out-of-memory load"
        if need > available:
            return False, f"{mib(need - available)} MiB short"
        return True, f"fits, {mib(available - need)} MiB to spare"
