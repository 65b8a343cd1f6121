"""Reloading the configuration: SIGHUP, the ``reload`` op, ``node-supervisor reload``.

The file is read again; a configuration that fails validation changes
nothing and the error names the key.  Otherwise core/reload.py decides what
each engine needs (restarted after draining, updated in place, added,
removed) and the settings that only a restart can change are named.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from workers.protocol import ErrorCode

from ..config import ConfigError, Settings, reload_settings
from ..core.effects import TOPIC_RELOAD
from ..core.engines import EngineState
from ..core.reload import apply_reload, compare, effective_settings
from ..core.supervision import Supervision
from ..core.errors import Refused
from ..logs import get_logger
from ..planning.measure.inputs import Planning
from .notices import ServiceNotices

log = get_logger("supervisor.daemon")


def reload_config(
    running: Settings,
    supervisor: Supervision,
    planning: Planning,
    fresh_engine: Callable[[str, Settings], EngineState],
    notices: ServiceNotices,
    reason: str,
) -> tuple[Settings, dict[str, Any]]:
    """Read the configuration again and hand its changes to the core.

    Returns the settings now in force (the new file's live settings over the
    running ones: the daemon keeps them) and the summary of what changed;
    raises Refused(invalid_config) and changes nothing when the file is invalid.
    ``fresh_engine(name, settings)`` builds an engine's state from the new settings.
    """
    if supervisor.engines.stopping:
        raise Refused(ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
    try:
        new = reload_settings(running)
    except ConfigError as exc:
        log.error("configuration reload refused; the running configuration stays", reason=reason, error=str(exc))
        supervisor.effects.publish(TOPIC_RELOAD, ok=False, error=str(exc))
        raise Refused(ErrorCode.INVALID_CONFIG, str(exc)) from None
    notices.reloading()
    changes = compare(running, new)
    settings = effective_settings(running, new)
    planning.settings = settings  # before the engines change: a restarted engine is planned with the new settings
    logging.getLogger().setLevel(settings.log_level.upper())
    apply_reload(supervisor, settings, changes, lambda name: fresh_engine(name, settings), time.monotonic())
    summary = changes.as_dict()
    log.info("configuration reloaded", reason=reason, **summary)
    if changes.needs_restart:
        log.warning("these settings keep their running values until the daemon restarts", keys=changes.needs_restart)
    supervisor.effects.publish(TOPIC_RELOAD, ok=True, **summary)
    notices.reloaded()
    return settings, summary
