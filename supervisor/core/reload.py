"""A new configuration while serving: what changes for each engine.  Pure.

Only engines whose load changed get a new worker, and never by cutting a
request off: the old worker finishes what it runs, takes nothing new
(``Engines.drain``), is stopped once idle and replaced by one loaded with
the new settings.  Meanwhile its waiting requests move to an engine that
serves, or wait for the new worker.  A removed engine drains the same way and
is dropped once its worker has gone; what waited on it moves on or, if pinned
to it, ends with ``unknown_engine``.  Engines whose changes do not touch the
load (priority, standby, objectives, queue bound) are updated in place.

Settings outside ``LIVE_SETTINGS`` (endpoints, directories, limits the
sockets were built with) keep their running values; the summary names them
so the operator knows a restart is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from workers.protocol import ErrorCode
from workers.protocol.messages import LOAD_SPEC_FIELDS

from ..config import EngineConfig, Settings
from .engines import EngineState
from .supervision import Supervision

# What a worker was loaded with: a change needs a new worker.  The load spec's own fields (but the
# split, which the placement decides, not the configuration), and the settings that decide them or
# the process around them.
PLANNED_ONLY = frozenset({"split_mib"})  # spec fields no setting names: the planner alone chooses them
LOAD_FIELDS = (frozenset(LOAD_SPEC_FIELDS) - PLANNED_ONLY) | {"kind", "env", "cache_types_allowed", "split"}
# Top-level settings a reload applies; the others hold until the daemon restarts.
LIVE_SETTINGS = ("engines", "models_dir", "supervision", "gpu", "log_level")


@dataclass
class ReloadChanges:
    """What a new configuration changes, engine by engine; the reload's reply and log line."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)  # load settings changed: drained, then a new worker
    updated: list[str] = field(default_factory=list)  # changed in place, the worker kept
    unchanged: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # other live settings that changed: supervision, gpu, log_level
    needs_restart: list[str] = field(default_factory=list)  # changed, but fixed until the daemon restarts

    def as_dict(self) -> dict[str, Any]:
        return {name: list(getattr(self, name)) for name in self.__dataclass_fields__}


def _load_changed(old: EngineConfig, new: EngineConfig) -> bool:
    return any(getattr(old, name) != getattr(new, name) for name in LOAD_FIELDS)


def compare(old: Settings, new: Settings) -> ReloadChanges:
    changes = ReloadChanges()
    for name, config in new.engines.items():
        before = old.engines.get(name)
        if before is None:
            changes.added.append(name)
        elif _load_changed(before, config):
            changes.restarted.append(name)
        elif before != config:
            changes.updated.append(name)
        else:
            changes.unchanged.append(name)
    changes.removed = [name for name in old.engines if name not in new.engines]
    for key in type(old).model_fields:
        if key != "engines" and getattr(old, key) != getattr(new, key):
            (changes.applied if key in LIVE_SETTINGS else changes.needs_restart).append(key)
    return changes


def effective_settings(old: Settings, new: Settings) -> Settings:
    """The new configuration's live settings over the running one's fixed settings."""
    return old.model_copy(update={key: getattr(new, key) for key in LIVE_SETTINGS})


def apply_reload(
    supervisor: Supervision, settings: Settings, changes: ReloadChanges, fresh: Callable[[str], EngineState], now: float
) -> None:
    """Carry ``changes`` out; ``fresh(name)`` builds an engine's state from the new settings
    (with the daemon's checks: environment present, model file present)."""
    engines, router = supervisor.engines, supervisor.router
    supervisor.reconfigure(settings)
    for name in changes.removed:
        engine = engines[name]
        engine.retired = True
        engine.hard_failure = (ErrorCode.UNKNOWN_ENGINE, f"engine {name!r} was removed by a configuration reload")
        router.reroute_queue(engine, now)
        engines.drain(engine, now)
    for name in changes.restarted:
        engine = engines[name]
        engine.take_config(fresh(name))
        engine.reload_pending = True
        if engine.refusal is not None:
            router.reroute_queue(engine, now)
        engines.drain(engine, now)
    for name in changes.updated:
        engine = engines[name]
        engine.config = settings.engines[name]
        engine.residency.keep_alive_s = engine.config.keep_alive_s
        if engine.config.standby == "warm":
            engines.ensure_running(engine, "configuration reloaded", now)
    for name in changes.added:
        engine = engines.add(fresh(name))
        if engine.config.standby == "warm" and engine.refusal is None:
            engines.start(engine, "added by a configuration reload", now)
    supervisor.route(now)  # a draining engine is not healthy: unpinned traffic and its waiting requests move on
