"""The status op's answer: the core's view of each engine and worker, with
what only the operating system knows (pids, memory) added."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from workers import protocol as p

from .. import __version__
from ..core.engines import EngineState
from ..gpu_probe import snapshot_to_dict
from ..io.planning import STATUS_SNAPSHOT_AGE_S, worker_gpu_bytes

if TYPE_CHECKING:
    from .app import Daemon


def daemon_status(daemon: "Daemon") -> dict[str, Any]:
    now = time.monotonic()
    snapshot = daemon.planning.snapshot(STATUS_SNAPSHOT_AGE_S)
    settings = daemon.settings
    return {
        "daemon": {
            "pid": os.getpid(),
            "version": __version__,
            "protocol": p.PROTOCOL_VERSION,
            "uptime_s": round(now - daemon.started_at, 1),
            "client_endpoint": settings.client_endpoint,
            "events_endpoint": settings.events_endpoint,
            "state_dir": str(settings.state_dir),
            "stopping": daemon.engines.stopping,
            "active_engine": daemon.switch.active,
            "requests_in_progress": len(daemon.router.requests),
            "metrics_url": daemon.metrics_url,
            "accounting_day": daemon.supervisor.budgets.day,
        },
        "gpu": snapshot_to_dict(snapshot),
        "engines": [{**engine.describe(now), **_plan(engine, snapshot), "workers": [_worker(daemon, engine, now, snapshot)]}
                    for engine in daemon.engines.by_priority()],  # fmt: skip
    }


def _plan(engine: EngineState, snapshot: Any) -> dict[str, Any]:
    """The plan in force (its choice, reasons and warnings; `node-supervisor plan` shows the whole table)."""
    warnings = list(engine.build_warnings)
    if engine.plan is None:
        return {"plan": None, "warnings": warnings}
    detail = engine.plan.engines[0].to_dict()
    return {"plan": {k: detail[k] for k in ("chosen", "reasons", "warnings", "device", "failed")}, "warnings": warnings + detail["warnings"]}


def _worker(daemon: "Daemon", engine: EngineState, now: float, snapshot: Any) -> dict[str, Any]:
    worker, report, times = engine.worker, engine.worker.report, engine.worker.times
    process = daemon.processes.get(worker.worker_id) if worker.alive else None
    info: dict[str, Any] = {
        "id": worker.worker_id,
        "state": worker.state.value,
        "reason": worker.reason,
        "pid": process.pid if process else None,
        "restarts": worker.restarts,
        "uptime_s": round(now - times.started_at, 1) if times.started_at and worker.alive else None,
        "python": report.hello.get("python"),
        "executable": report.hello.get("executable"),
        "packages": report.hello.get("packages", {}),
        "versions": report.hello.get("versions", {}),
        "model": report.model,
        "load_progress": report.load_progress,
        "phase": report.heartbeat.get("phase"),
        "requests": [g.id for g in worker.running.values()],
        "last_heartbeat_age_ms": round((now - times.last_heard) * 1000, 1) if times.last_heard and worker.alive else None,
        "rss_bytes": process.rss() if process else None,
        "gpu_memory_bytes": worker_gpu_bytes(snapshot, process.pid if process else None),
        "last_exit": worker.last_exit,
    }
    if report.load_failure:
        info["load_failure"] = report.load_failure
    if report.failure:
        info["failure"] = report.failure
    return info
