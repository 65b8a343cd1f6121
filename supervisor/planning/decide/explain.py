"""Why the planner chose what it chose, in sentences an operator reads.

One sentence per decision (where, which variant, how many layers, what context,
what KV cache), each naming the figure that decided it, so a surprising plan
can be traced to the estimate, the reserve or a neighbour without a debugger.
"""

from __future__ import annotations

from .search import Search, ctx_steps, mib, variant_name
from .types import Candidate


def describe(candidate: Candidate) -> str:
    """One candidate in a line: variant, layers, context, cache, place."""
    return f"{variant_name(candidate.path)}, {candidate.layers_text} layers, n_ctx {candidate.n_ctx}, {candidate.cache_type} KV cache, on {candidate.where}"


def explain(search: Search, chosen: Candidate | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(reasons, warnings) for one engine's plan."""
    warnings = list(search.request.notes)
    if chosen is None:
        return (_nothing(search),), tuple(warnings)
    reasons = [
        _where(search, chosen),
        _variant(search, chosen),
        _layers(search, chosen),
        _context(search, chosen),
        _cache(search, chosen),
    ]
    if search.failed:
        tried = "; ".join(describe(c) for c in search.failed)
        reasons.append(
            f"after {len(search.failed)} out-of-memory load(s) ({tried}) the next must need under {mib(search.cap)} MiB on the GPU"
        )
    return tuple(reasons), tuple(warnings + _warnings(search, chosen))


def _where(search: Search, chosen: Candidate) -> str:
    budget = search.budget
    if chosen.device is None or budget is None:
        if search.explicit == 0:
            return "CPU: n_gpu_layers = 0 in the config"
        if budget is None:
            return f"CPU: no usable GPU ({search.gpu_reason})"
        if search.failed:
            return f"CPU: nothing smaller than what ran out of memory fits on GPU {budget.index}"
        return f"CPU: not even one layer fits on GPU {budget.index} ({mib(budget.available_bytes)} MiB available)"
    if chosen.devices:
        shares = " + ".join(f"{mib(b)} MiB on GPU {d}" for d, b in zip(chosen.devices, chosen.device_bytes))
        return (
            f"split across {chosen.where}: no single GPU holds it whole (GPU {budget.index}, the roomiest, has "
            f"{mib(budget.available_bytes)} MiB available); {shares}, in proportion to their room"
        )
    parts = [f"{mib(budget.free_bytes)} free"]
    if budget.own_bytes:
        parts.append(f"+ {mib(budget.own_bytes)} held by this engine's own worker")
    if budget.reserve_bytes:
        parts.append(f"- {mib(budget.reserve_bytes)} reserved")
    most = f", the most of {search.device_count} GPUs" if search.device_count > 1 else ""
    return f"GPU {budget.index} ({budget.name}): {mib(budget.available_bytes)} MiB available ({' '.join(parts)}){most}"


def _variant(search: Search, chosen: Candidate) -> str:
    name = variant_name(chosen.path)
    if chosen.variant == 0:
        return f"variant {name}: the first (best) configured" if len(search.request.variants) > 1 else f"variant {name}"
    better = "; ".join(_smallest_need(search, index) for index in range(chosen.variant))
    return f"variant {name}: the better ones do not fit ({better})"


def _smallest_need(search: Search, variant: int) -> str:
    name = variant_name(search.request.variants[variant].path)
    needs = [row.gpu_bytes for row in search.rows if row.variant == variant and row.n_gpu_layers != 0]
    return f"{name} needs at least {mib(min(needs))} MiB" if needs else f"{name} was not tried"


def _layers(search: Search, chosen: Candidate) -> str:
    if search.explicit is not None:
        return f"n_gpu_layers = {search.explicit} as configured (an explicit value is kept)"
    if chosen.n_gpu_layers == 0:
        return "no layers on the GPU"
    if chosen.layers_text == "all":
        return f"all {chosen.total_layers - 1} layers and the output layer on the GPU"
    more = next(
        (r for r in search.rows if r.variant == chosen.variant and r.n_gpu_layers == chosen.n_gpu_layers + 1), None
    )
    tail = f"; {more.n_gpu_layers} would need {mib(more.gpu_bytes)} MiB" if more else ""
    return f"{chosen.layers_text} layers on the GPU: the most that fit ({mib(chosen.gpu_bytes)} of {mib(chosen.free_bytes)} MiB){tail}"


def _context(search: Search, chosen: Candidate) -> str:
    requested = search.request.n_ctx
    if chosen.n_ctx == requested:
        return f"n_ctx {requested} as requested"
    first = next(
        (
            r
            for r in search.rows
            if (r.variant, r.n_gpu_layers, r.cache_type, r.n_ctx) == (chosen.variant, -1, chosen.cache_type, requested)
        ),
        None,
    )
    why = f": {requested} needs {mib(first.gpu_bytes)} MiB" if first else ""
    return f"n_ctx {chosen.n_ctx} instead of the requested {requested}{why}"


def _cache(search: Search, chosen: Candidate) -> str:
    configured = search.request.cache_types[0]
    if chosen.cache_type == configured:
        return f"{configured} KV cache as configured"
    floor = ctx_steps(search.request.n_ctx, search.request.min_ctx)[-1]
    return f"{chosen.cache_type} KV cache: with {configured} it does not fit even at n_ctx {floor}"


def _warnings(search: Search, chosen: Candidate) -> list[str]:
    warnings = []
    budget = search.budget
    if search.explicit is not None and not chosen.fits:
        if budget is None:
            warnings.append(
                f"n_gpu_layers = {search.explicit} but no usable GPU ({search.gpu_reason}): llama.cpp runs on the CPU or fails"
            )
        else:
            warnings.append(
                f"n_gpu_layers = {search.explicit} needs {mib(chosen.gpu_bytes)} MiB on GPU {budget.index}, {mib(budget.available_bytes)} MiB "
                'available: the load will likely run out of memory; n_gpu_layers = "auto" lets the planner choose'
            )
    if search.ram_available is not None and chosen.ram_bytes > search.ram_available:
        warnings.append(f"needs {mib(chosen.ram_bytes)} MiB of RAM, {mib(search.ram_available)} MiB available")
    exl2 = [variant_name(f.path) for f in search.request.variants if f.format == "exl2"]
    if exl2 and chosen.layers_text != "all":
        warnings.append(f"EXL2 variants load whole onto one GPU, not in part nor on the CPU: {', '.join(exl2)} skipped")
    return warnings


def _nothing(search: Search) -> str:
    """No placement at all: say which wall was hit."""
    if not search.request.variants:
        return "no model variant could be read"
    if search.explicit is not None:
        return f'n_gpu_layers = {search.explicit} ran out of GPU memory; an explicit value is kept: n_gpu_layers = "auto" lets the planner step down'
    if search.failed:
        return "nothing smaller is left after the out-of-memory load(s), the CPU included"
    if search.budget is None:
        return f"ExLlamaV2 needs a GPU and none is usable: {search.gpu_reason}"
    needs = "; ".join(_smallest_need(search, index) for index in range(len(search.request.variants)))
    return f"ExLlamaV2 loads the whole model onto one GPU and no variant fits ({needs} of {mib(search.budget.available_bytes)} MiB)"
