"""`node-supervisor plan`: what each engine would get on this node's GPU, and why.

Starts nothing.  Reads every configured variant's facts and probes the GPUs
(or, with ``--gpu-memory``, imagines one empty device of that size), then
prints the planner's table and choice per engine.  A running daemon is asked
for its workers' pids, so the memory they hold counts as theirs to reuse.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import psutil
import zmq

from ..client import Client, ClientTimeout
from ..config import EngineConfig, Settings
from ..planning.decide.plan import make_plan
from ..planning.decide.types import MIB, Estimators, GpuPolicy, Plan, PlanInputs
from ..planning.decide.explain import describe
from ..planning.decide.search import mib, variant_name
from .output import print_json

DAEMON_TIMEOUT_S = 0.5  # asking a daemon for its workers' pids: it answers in milliseconds or is not there
COLUMNS = ("variant", "layers", "n_ctx", "cache", "needs GPU MiB", "needs RAM MiB", "free MiB", "fits")


def plan_command(settings: Settings, args: argparse.Namespace) -> int:
    from ..planning.decide.estimate import (
        estimate_exl2,
        estimate_llamacpp,
    )  # the estimator, probe and model readers load only here

    engines = {name: config for name, config in settings.engines.items() if args.engine in (None, name)}
    if not engines:
        print(
            f"node-supervisor: no engine named {args.engine!r} (configured: {', '.join(settings.engines)})",
            file=sys.stderr,
        )
        return 2
    snapshot = _snapshot(args.gpu_memory)
    own_pids = {} if args.gpu_memory else _daemon_worker_pids(settings)
    from ..planning.measure.inputs import PLANNED_KINDS

    skipped = {
        name: f"the {config.kind} engine has no model"
        for name, config in engines.items()
        if config.kind not in PLANNED_KINDS
    }
    requests = [
        _request(settings, name, config, own_pids.get(name, frozenset()))
        for name, config in engines.items()
        if name not in skipped
    ]
    estimators = Estimators(llamacpp=estimate_llamacpp, exl2=estimate_exl2)
    policy = GpuPolicy.from_config(settings.gpu, args.reserve)
    plan = make_plan(PlanInputs(snapshot, tuple(requests), policy, estimators, psutil.virtual_memory().available))
    if args.json:
        print_json(_as_dict(plan, skipped, own_pids))
    else:
        print(format_plan(plan, skipped))
    return 0 if all(e.chosen is not None for e in plan.engines) else 1


def _snapshot(gpu_memory_mib: int | None) -> Any:
    """The probe's view, or one hypothetical empty device ("what would run on an 8 GB card")."""
    from ..planning.measure.gpu import GpuDevice, GpuSnapshot, probe

    if gpu_memory_mib is None:
        return probe()
    size = gpu_memory_mib * MIB
    device = GpuDevice(
        index=0,
        name=f"hypothetical {gpu_memory_mib} MiB GPU",
        uuid="hypothetical",
        total_bytes=size,
        free_bytes=size,
        used_bytes=0,
        processes=(),
    )
    reason = f"--gpu-memory {gpu_memory_mib}: one hypothetical device with nothing on it"
    return GpuSnapshot(devices=(device,), driver_version=None, cuda_version=None, reason=reason)


def _request(settings: Settings, name: str, config: EngineConfig, own_pids: frozenset[int]) -> Any:
    """The engine's request, with each variant's facts; unreadable variants become notes."""
    from ..planning.measure.inputs import Planning

    return Planning(settings).request(name, config, own_pids)


def _daemon_worker_pids(settings: Settings) -> dict[str, frozenset[int]]:
    """A running daemon's workers by engine; none when no daemon answers at once."""
    endpoint = settings.client_endpoint or ""
    if endpoint.startswith("ipc://") and not Path(endpoint[len("ipc://") :]).exists():
        return {}
    try:
        with Client(endpoint, timeout_s=DAEMON_TIMEOUT_S) as client:
            reply = client.status()
    except (ClientTimeout, zmq.ZMQError):
        return {}
    pids: dict[str, frozenset[int]] = {}
    for engine in reply.get("engines", []):
        pids[engine["name"]] = frozenset(w["pid"] for w in engine.get("workers", []) if w.get("pid"))
    return pids


def format_plan(plan: Plan, skipped: dict[str, str]) -> str:
    lines = [f"GPUs: {_gpus(plan)}"]
    for engine in plan.engines:
        lines += ["", f"engine {engine.engine}"]
        if engine.device:
            d = engine.device
            lines.append(
                f"  GPU {d.index} ({d.name}): total {mib(d.total_bytes)} MiB, free {mib(d.free_bytes)}, "
                f"own worker {mib(d.own_bytes)}, reserved {mib(d.reserve_bytes)}: available {mib(d.available_bytes)} MiB"
            )
        lines += ["  " + line for line in _table(engine.candidates)]
        chosen = describe(engine.chosen) if engine.chosen else "nothing"
        lines.append(f"  chosen: {chosen} because {'; '.join(engine.reasons)}")
        lines += [f"  warning: {warning}" for warning in engine.warnings]
    lines += [f"\nengine {name}: not planned ({why})" for name, why in skipped.items()]
    return "\n".join(lines)


def _gpus(plan: Plan) -> str:
    devices = plan.inputs.snapshot.devices
    if not devices:
        return f"none usable ({plan.gpu_reason}): every engine plans for the CPU"
    return (
        ", ".join(f"{d.index}: {d.name} {mib(d.total_bytes)} MiB ({mib(d.free_bytes)} free)" for d in devices)
        + f" [{plan.gpu_reason}]"
    )


def _table(candidates: Any) -> list[str]:
    rows = [COLUMNS] + [
        (
            variant_name(c.path),
            c.layers_text,
            str(c.n_ctx),
            c.cache_type,
            mib(c.gpu_bytes),
            mib(c.ram_bytes),
            mib(c.free_bytes),
            ("yes, " + c.verdict.removeprefix("fits ") if c.devices else "yes") if c.fits else f"no: {c.verdict}",
        )
        for c in candidates
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    return [
        "  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        + "  "
        + row[-1]
        for row in rows
    ]


def _as_dict(plan: Plan, skipped: dict[str, str], own_pids: dict[str, frozenset[int]]) -> dict[str, Any]:
    from ..planning.measure.gpu import snapshot_to_dict

    policy = plan.inputs.policy
    return {
        "gpu": snapshot_to_dict(plan.inputs.snapshot),
        "policy": {
            "reserve_bytes": policy.reserve_bytes,
            "reserve_percent": policy.reserve_percent,
            "safety_margin": policy.safety_margin,
            "cuda_overhead_bytes": policy.cuda_overhead_bytes,
        },
        "daemon_workers": {name: sorted(pids) for name, pids in own_pids.items()},
        "engines": [engine.to_dict() for engine in plan.engines],
        "skipped": skipped,
    }
