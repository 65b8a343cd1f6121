"""The status op's answer: the core's view of each engine and worker, with
what only the operating system knows (pids, memory) added."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from workers import protocol as p

from .. import __version__
from ..config import Settings
from ..config.discovery import scan
from ..core.engines import EngineState
from ..core.supervision import Supervision
from ..io.worker_process import WorkerProcess
from ..planning.measure.gpu import snapshot_to_dict
from ..planning.measure.inputs import PLANNED_KINDS, STATUS_SNAPSHOT_AGE_S, Planning, worker_gpu_bytes


def daemon_status(
    settings: Settings,
    supervisor: Supervision,
    planning: Planning,
    processes: Mapping[str, WorkerProcess],
    started_at: float,
    metrics_url: str | None,
) -> dict[str, Any]:
    now = time.monotonic()
    snapshot = planning.snapshot(STATUS_SNAPSHOT_AGE_S)
    engines = supervisor.engines
    return {
        "daemon": {
            "pid": os.getpid(),
            "version": __version__,
            "protocol": p.PROTOCOL_VERSION,
            "uptime_s": round(now - started_at, 1),
            "client_endpoint": settings.client_endpoint,
            "events_endpoint": settings.events_endpoint,
            "state_dir": str(settings.state_dir),
            "stopping": engines.stopping,
            "phase": engines.phase(),  # before this answer existed, start-up's (io/startup_front.py)
            "serving": engines.serving,
            "active_engine": supervisor.switch.active,
            "requests_in_progress": len(supervisor.router.requests),
            "metrics_url": metrics_url,
            "accounting_day": supervisor.budgets.day,
        },
        "gpu": snapshot_to_dict(snapshot),
        "engines": [
            {**engine.describe(now), **_plan(engine, snapshot), "workers": [_worker(processes, engine, now, snapshot)]}
            for engine in engines.by_priority()
        ],
    }


def _plan(engine: EngineState, snapshot: Any) -> dict[str, Any]:
    """The plan in force (its choice, reasons and warnings; `node-supervisor plan` shows the whole table)."""
    warnings = list(engine.build_warnings)
    if engine.plan is None:
        return {"plan": None, "warnings": warnings}
    detail = engine.plan.engines[0].to_dict()
    return {
        "plan": {k: detail[k] for k in ("chosen", "reasons", "warnings", "device", "failed")},
        "warnings": warnings + detail["warnings"],
    }


def _worker(processes: Mapping[str, WorkerProcess], engine: EngineState, now: float, snapshot: Any) -> dict[str, Any]:
    worker, report, times = engine.worker, engine.worker.report, engine.worker.times
    process = processes.get(worker.worker_id) if worker.alive else None
    hello = report.hello
    info: dict[str, Any] = {
        "id": worker.worker_id,
        "state": worker.state.value,
        "reason": worker.reason,
        "pid": process.pid if process else None,
        "restarts": worker.restarts,
        "uptime_s": round(now - times.started_at, 1) if times.started_at and worker.alive else None,
        "python": hello.python if hello else None,
        "executable": hello.executable if hello else None,
        "packages": hello.packages if hello else {},
        "versions": hello.versions if hello else {},
        "model": report.model,
        "load_progress": report.load_progress,
        "phase": report.heartbeat.phase if report.heartbeat else None,
        "requests": [g.id for g in worker.running.values()],
        "last_heartbeat_age_ms": round((now - times.last_heard) * 1000, 1)
        if times.last_heard and worker.alive
        else None,
        "rss_bytes": process.rss() if process else None,
        "gpu_memory_bytes": worker_gpu_bytes(snapshot, process.pid if process else None),
        "last_exit": worker.last_exit,
    }
    if report.load_failure:
        info["load_failure"] = asdict(report.load_failure)
    if report.failure:
        info["failure"] = asdict(report.failure)
    return info


def models_listing(
    settings: Settings, supervisor: Supervision, planning: Planning, processes: Mapping[str, WorkerProcess]
) -> dict[str, Any]:
    """The ps op's answer (as `ollama ps` and `ollama list` together): every engine with what it holds
    now, the model files that cannot be served with the reason, directories that cannot be read."""
    now = time.monotonic()
    snapshot = planning.snapshot(STATUS_SNAPSHOT_AGE_S)
    found, problems = scan(settings.model_dirs)
    models = []
    for engine in supervisor.engines.by_priority():
        worker = engine.worker
        process = processes.get(worker.worker_id) if worker.alive else None
        chosen, refusal = engine.chosen, engine.refusal
        measured = worker_gpu_bytes(snapshot, process.pid if process else None)
        residency = engine.describe_residency(now)
        models.append(
            {
                "engine": engine.name,
                "kind": engine.config.kind,
                "model": engine.model_path,
                "available": refusal is None,  # takes traffic now
                "state": refusal[0] if refusal else ("waiting" if residency["waiting"] else worker.state.value),
                "reason": refusal[1] if refusal else (residency["waiting"] or worker.reason),
                "load_progress": worker.report.load_progress if worker.state.value == "loading" else None,
                "gpu_bytes_measured": measured,
                # Split: what was planned on its devices together (each device's in device_mib).
                "gpu_bytes_planned": sum(engine.residency.shares)
                if len(engine.residency.shares) > 1
                else (chosen.gpu_bytes if chosen is not None else None),
                "rss_bytes": process.rss() if process else None,
                "pid": process.pid if process else None,
                "requests": engine.in_flight() + engine.waiting(),
                "n_ctx": chosen.n_ctx if chosen is not None else engine.config.n_ctx,
                "file": _model_file(planning, engine),
                **residency,
            }
        )
    unavailable = [model.as_dict() for model in found if not model.available]
    return {"models": models, "unavailable": unavailable, "problems": problems, "gpu_reason": snapshot.reason}


def _model_file(planning: Planning, engine: EngineState) -> dict[str, Any] | None:
    """What the model's file says of itself (its header, read as planning reads it; cached by file), and its
    size and time; None for an engine without a file (remote, fake) or one that cannot be read."""
    if engine.config.kind not in PLANNED_KINDS or not engine.model_path:
        return None
    path = Path(engine.model_path)
    facts = planning.facts(path)
    try:
        modified = path.stat().st_mtime
    except OSError:
        return None
    if facts is None:
        return None
    return {
        "path": str(path),
        "format": facts.format,
        "architecture": facts.architecture,
        "parameters": facts.parameters,
        "file_type": facts.file_type,
        "bits": facts.bits,
        "bytes": facts.file_bytes,
        "modified": modified,
        "n_ctx_train": facts.n_ctx_train,
        "n_embd": facts.n_embd,
        "n_layer": facts.n_layer,
        "n_head": facts.n_head,
        "n_head_kv": facts.n_head_kv,
        "n_vocab": facts.n_vocab,
    }
