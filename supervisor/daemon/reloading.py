"""Reloading the configuration: SIGHUP, the ``reload`` op, ``node-supervisor reload``.

The file is read again; a configuration that fails validation changes
nothing and the error names the key.  Otherwise core/reload.py decides what
each engine needs (restarted after draining, updated in place, added,
removed) and the settings that only a restart can change are named.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from workers.protocol import ErrorCode

from ..config import ConfigError, reload_settings
from ..core.effects import TOPIC_RELOAD
from ..core.reload import apply_reload, compare, effective_settings
from ..core.validate import InvalidMessage
from ..logs import get_logger

if TYPE_CHECKING:
    from .app import Daemon

log = get_logger("supervisor.daemon")


def reload_config(daemon: "Daemon", reason: str) -> dict[str, Any]:
    """Apply the configuration as it is now; the summary of what changed, or InvalidMessage(invalid_config)."""
    if daemon.engines.stopping:
        raise InvalidMessage(ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
    try:
        new = reload_settings(daemon.settings)
    except ConfigError as exc:
        log.error("configuration reload refused; the running configuration stays", reason=reason, error=str(exc))
        daemon.publish(TOPIC_RELOAD, ok=False, error=str(exc))
        raise InvalidMessage(ErrorCode.INVALID_CONFIG, str(exc)) from None
    daemon.notices.reloading()
    changes = compare(daemon.settings, new)
    settings = effective_settings(daemon.settings, new)
    daemon.settings = daemon.planning.settings = settings
    logging.getLogger().setLevel(settings.log_level.upper())
    apply_reload(daemon.supervisor, settings, changes, lambda name: daemon.engine_state(name), time.monotonic())
    summary = changes.as_dict()
    log.info("configuration reloaded", reason=reason, **summary)
    if changes.needs_restart:
        log.warning("these settings keep their running values until the daemon restarts", keys=changes.needs_restart)
    daemon.publish(TOPIC_RELOAD, ok=True, **summary)
    daemon.notices.reloaded()
    return summary
