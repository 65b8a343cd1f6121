"""Where the service keeps its configuration and state: under %ProgramData%.

A service runs as LocalSystem (or a service account) whose home directory is
no place for models and environments, so the defaults that ``node-supervisor
run`` takes from the user's home move to ``%ProgramData%\\node-supervisor``:

    config.toml   the configuration file (unless NODESUP_CONFIG names another)
    state\\        state_dir: environments, logs, the lock
    data\\         data_dir: models

Keys set in the file or in NODESUP_* variables win over these defaults,
exactly as they do for ``node-supervisor run``.
"""

from __future__ import annotations

import os
from pathlib import Path

from supervisor.config import Settings, find_config_file, load_settings

APP_DIR_NAME = "node-supervisor"
DEFAULT_PROGRAMDATA = r"C:\ProgramData"


def programdata_dir() -> Path:
    """``%ProgramData%\\node-supervisor``."""
    return Path(os.environ.get("PROGRAMDATA") or DEFAULT_PROGRAMDATA) / APP_DIR_NAME


def service_config_file() -> Path | None:
    """NODESUP_CONFIG if set (it must exist), else %ProgramData%\\node-supervisor\\config.toml if it exists."""
    if os.environ.get("NODESUP_CONFIG"):
        return find_config_file(None)
    default = programdata_dir() / "config.toml"
    return default if default.is_file() else None


def load_service_settings() -> Settings:
    """The service's settings; raises ConfigError (one line naming the key) like the CLI.

    state_dir and data_dir default to %ProgramData% only where neither the
    file nor the environment set them: the settings are read once to find
    out, and again with the defaults for the keys nobody set (every
    path derived from state_dir, endpoints included, follows it).
    """
    config_file = service_config_file()
    settings = load_settings(config_file)
    base = programdata_dir()
    defaults = {
        key: base / sub
        for key, sub in (("state_dir", "state"), ("data_dir", "data"))
        if key not in settings.model_fields_set
    }
    return load_settings(config_file, defaults) if defaults else settings
