"""Configuration: a TOML file, NODESUP_* environment variables, command-line flags.

Precedence, highest first: flags, environment, file, defaults.  Nested keys
in the environment use a double underscore:
``NODESUP_ENGINES__LLAMA__N_CTX=4096``.  docs/CONFIG.md is the reference;
keep it in step with this module.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, get_origin

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from .discovery import merge_engines, scan

# The tables live in their own module; they are part of this module's interface.
from .sections import (
    ENGINE_KINDS,
    KV_CACHE_TYPES,
    REMOTE_KINDS,
    CacheType,
    EngineConfig,
    EnvConfig,
    GpuConfig,
    HttpConfig,
    MetricsConfig,
    SecurityConfig,
    SupervisionConfig,
    UpstreamConfig,
    is_loopback,
    split_listen,
)

__all__ = [
    "ENGINE_KINDS",
    "KV_CACHE_TYPES",
    "REMOTE_KINDS",
    "SERVICE_CONFIG_FILE",
    "CacheType",
    "ConfigError",
    "EngineConfig",
    "EnvConfig",
    "GpuConfig",
    "HttpConfig",
    "MetricsConfig",
    "SecurityConfig",
    "Settings",
    "SupervisionConfig",
    "UpstreamConfig",
    "find_config_file",
    "is_loopback",
    "load_settings",
    "reload_settings",
    "split_listen",
    "unknown_environment_variables",
]

ENV_PREFIX = "NODESUP_"
# NODESUP_* variables that are not settings but are read by name elsewhere:
# the config file's path (find_config_file), and the test suite's shared
# state and ExLlamaV2 GPU test inputs (tests/conftest.py, tests/test_exllamav2_gpu.py).
NON_SETTING_VARIABLES = frozenset(
    {"NODESUP_CONFIG", "NODESUP_TEST_STATE", "NODESUP_EXL2_MODEL_DIR", "NODESUP_EXL2_PYTHON", "NODESUP_TEST_GPU"}
)
_ENGINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback)


# The system service's file: `install-service` writes it and its unit names it; the last default path,
# so the command line finds the service's state directory (and socket) without flags.
SERVICE_CONFIG_FILE = Path("/etc/node-supervisor/config.toml")


def default_config_paths() -> list[Path]:
    """Where the daemon looks for its file when --config and NODESUP_CONFIG are absent."""
    return [_xdg("XDG_CONFIG_HOME", ".config") / "node-supervisor" / "config.toml", SERVICE_CONFIG_FILE]


class ConfigError(Exception):
    """One line naming the key and the problem."""


# Files that exist where an NVIDIA driver is loaded (Linux; Windows: its NVML library).
NVIDIA_DRIVER_FILES = (
    Path("/proc/driver/nvidia/version"),
    Path("/dev/nvidiactl"),
    Path(os.environ.get("SystemRoot", "C:/Windows")) / "System32" / "nvml.dll",
)


def nvidia_driver_present() -> bool:
    """Whether this node can run CUDA engines at all (a driver, whatever its devices)."""
    return any(path.exists() for path in NVIDIA_DRIVER_FILES)


def _default_engines(models_home: Path | None = None) -> dict[str, EngineConfig]:
    """llama.cpp on the default model; ExLlamaV2 as the fallback only where an NVIDIA driver is (elsewhere
    it could never serve, and its environment is PyTorch: a gigabyte and most of a first start) and its
    EXL2 model directory ``<models_home>/exl2`` is there (none ships).  Only when the configuration names
    no engines: a configured ExLlamaV2 engine stays, whatever the node."""
    engines = {"llama": EngineConfig(kind="llamacpp", priority=10)}
    if nvidia_driver_present() and models_home is not None and (models_home / "exl2").is_dir():
        engines["exllamav2"] = EngineConfig(kind="exllamav2", priority=20)
    return engines


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")
    config_file: ClassVar[Path | None] = None  # the TOML file, set by load_settings
    overrides: ClassVar[dict[str, Any]] = {}  # the command line's settings, set by load_settings

    state_dir: Path = Field(default_factory=lambda: _xdg("XDG_STATE_HOME", ".local/state") / "node-supervisor")
    data_dir: Path = Field(default_factory=lambda: _xdg("XDG_DATA_HOME", ".local/share") / "node-supervisor")
    log_dir: Path | None = None  # default: <state_dir>/logs
    envs_dir: Path | None = None  # default: <state_dir>/envs
    client_endpoint: str | None = None  # default: ipc://<state_dir>/run/client.sock (tcp on Windows)
    worker_endpoint: str | None = None  # default: ipc://<state_dir>/run/workers.sock (tcp on Windows)
    events_endpoint: str | None = None  # default: ipc://<state_dir>/run/events.sock (tcp on Windows)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "console", "json"] = "auto"
    log_max_bytes: int = Field(
        50 << 20, ge=0, description="the JSON log file is rotated at this size; 0: never (an external logrotate may)"
    )
    log_backups: int = Field(5, ge=0, le=1000, description="rotated files kept: <file>.1 (newest) ... <file>.N")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60)
    load_timeout_s: float = Field(600.0, gt=0)
    shutdown_grace_s: float = Field(5.0, ge=0, le=600)
    max_message_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    max_tokens_limit: int = Field(8192, gt=0)
    create_envs: bool = True
    systemd_ready: Literal["serving", "bound"] = Field(
        "serving", description="READY=1 once an engine can generate, or once the client socket is bound"
    )
    pip_args: list[str] = Field(default_factory=list, description="extra arguments for pip when creating environments")
    llama_cuda: Literal["auto", "on", "off"] = Field(
        "auto", description="llama.cpp with CUDA; auto: when an NVIDIA driver and nvcc are present"
    )
    envs: dict[str, EnvConfig] = Field(default_factory=dict, description="per-environment build options")
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    models_dir: list[Path] | None = Field(
        None,
        description="directories whose GGUF files and EXL2 directories become engines; unset: [<data_dir>/models]",
    )
    engines: dict[str, EngineConfig] = Field(default_factory=_default_engines)

    @model_validator(mode="before")
    @classmethod
    def _engines_for_this_node(cls, data: Any) -> Any:
        """No engines named: the defaults that fit this node.  Then the models in models_dir join the
        engines table (config/discovery.py), before it is validated."""
        if not isinstance(data, dict):
            return data
        models_home = Path(data.get("data_dir") or _xdg("XDG_DATA_HOME", ".local/share") / "node-supervisor") / "models"
        if data.get("engines") is None:
            data = {**data, "engines": _default_engines(models_home)}
        directories = data.get("models_dir")
        if directories is None:
            directories = [models_home]
        if not isinstance(directories, list) or not all(isinstance(d, (str, Path)) for d in directories):
            return data  # the field's own check names the problem
        found, _ = scan([Path(d) for d in directories])
        if not any(model.available for model in found):
            return data
        return {**data, "engines": merge_engines(data["engines"], found)}

    @field_validator("engines")
    @classmethod
    def _engine_names(cls, engines: dict[str, EngineConfig]) -> dict[str, EngineConfig]:
        for name in engines:
            if not _ENGINE_NAME.match(name):
                raise ValueError(f"engine name {name!r} must be letters, digits, '-' or '_'")
        if not engines:
            # An absent table means the defaults; an empty one would serve nothing
            # (or, as it once did, silently the defaults the file meant to replace).
            raise ValueError("at least one engine is needed; leave the table out for the defaults")
        _check_aliases(engines)
        return engines

    @field_validator("client_endpoint", "worker_endpoint", "events_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(ipc|tcp)://.+", value):
            raise ValueError("must start with ipc:// or tcp://")
        return value

    @model_validator(mode="after")
    def _derived_paths(self) -> "Settings":
        if self.log_dir is None:
            self.log_dir = self.state_dir / "logs"
        if self.envs_dir is None:
            self.envs_dir = self.state_dir / "envs"
        if self.client_endpoint is None:
            self.client_endpoint = _local_endpoint(self.state_dir, "client.sock", 5557)
        if self.worker_endpoint is None:
            self.worker_endpoint = _local_endpoint(self.state_dir, "workers.sock", 0)
        if self.events_endpoint is None:
            self.events_endpoint = _local_endpoint(self.state_dir, "events.sock", 5558)
        security = self.security
        security.keys_dir = security.keys_dir or self.state_dir / "keys"
        security.authorized_keys_dir = security.authorized_keys_dir or security.keys_dir / "authorized"
        security.server_key_file = security.server_key_file or security.keys_dir / "server.key"
        security.client_key_file = security.client_key_file or security.keys_dir / "clients" / "local.key_secret"
        return self

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def models_home(self) -> Path:
        """Where the default model (and `node-supervisor pull`) put model files: <data_dir>/models."""
        return self.data_dir / "models"

    @property
    def model_dirs(self) -> list[Path]:
        """The directories scanned for models (``models_dir``, else <data_dir>/models)."""
        return [d.expanduser() for d in self.models_dir] if self.models_dir is not None else [self.models_home]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = cls.config_file
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if toml_file is not None:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=toml_file),)
        return sources


def _check_aliases(engines: dict[str, EngineConfig]) -> None:
    """An HTTP `model` names one engine: aliases are unique and never another engine's name."""
    owner: dict[str, str] = {}
    for name, config in engines.items():
        for alias in config.aliases:
            if alias in engines:
                raise ValueError(f"engines.{name}.aliases: {alias!r} is the name of an engine")
            if alias in owner:
                raise ValueError(f"engines.{name}.aliases: {alias!r} is also an alias of engine {owner[alias]!r}")
            owner[alias] = name


def _local_endpoint(state_dir: Path, socket_name: str, tcp_port: int) -> str:
    """ipc:// where the platform has it; pyzmq's Windows wheels do not."""
    if sys.platform == "win32":
        return f"tcp://127.0.0.1:{tcp_port}" if tcp_port else "tcp://127.0.0.1:*"
    return f"ipc://{state_dir / 'run' / socket_name}"


def find_config_file(explicit: str | Path | None) -> Path | None:
    """--config, else NODESUP_CONFIG, else the first default path that exists."""
    chosen = explicit or os.environ.get("NODESUP_CONFIG")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    return next((p for p in default_config_paths() if p.is_file()), None)


def load_settings(config_file: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings; raise ConfigError with one line naming the key on any problem."""

    class FileSettings(Settings):
        pass

    FileSettings.config_file = config_file
    FileSettings.overrides = dict(overrides or {})

    try:
        return FileSettings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, config_file)) from None
    except SettingsError as exc:
        raise ConfigError(_environment_error(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_file}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config_file}: not UTF-8 (TOML files must be): {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{config_file or 'configuration'}: cannot read: {exc.strerror or exc}") from None


def reload_settings(current: Settings) -> Settings:
    """The configuration read again from where ``current`` came from: the same file, the same
    command-line settings, the process environment.  ConfigError as load_settings."""
    return load_settings(type(current).config_file, type(current).overrides)


def _environment_error(exc: SettingsError) -> str:
    """pydantic-settings reports a list or table variable that is not JSON without
    naming the variable or the value's problem; say both on one line."""
    match = re.search(r'field "([^"]+)"', str(exc))
    if match is None:
        return str(exc)
    key = match.group(1)
    cause = f" ({exc.__cause__})" if exc.__cause__ else ""
    return f"{key}: {ENV_PREFIX}{key.upper()} is not valid JSON{cause}; lists and tables are given as JSON"


def unknown_environment_variables(environ: Mapping[str, str]) -> list[str]:
    """The NODESUP_* names in ``environ`` that configure nothing, sorted.

    pydantic-settings ignores them, so a typo (NODESUP_LOGLEVEL) would
    silently leave the setting at its default; callers warn about these.
    Names are matched without regard to case, as the settings are read.
    """
    nested = {name for name, field in Settings.model_fields.items() if _has_nested_keys(field.annotation)}
    unknown = []
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NON_SETTING_VARIABLES:
            continue
        key, delimiter, _ = upper[len(ENV_PREFIX) :].lower().partition("__")
        if key not in Settings.model_fields or (delimiter and key not in nested):
            unknown.append(name)
    return sorted(unknown)


def _has_nested_keys(annotation: Any) -> bool:
    """Tables (a model or a dict) can be set key by key with ``__``."""
    return get_origin(annotation) is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel))


def _first_error(exc: ValidationError, config_file: Path | None) -> str:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    where = f"{config_file}: " if config_file else ""
    value = error.get("input")
    # A key's value is never echoed: an API key written where a variable's name belongs would reach the journal.
    secret = any("key" in str(part) for part in error["loc"])
    shown = "" if isinstance(value, dict) or value is None or secret else f" (got {value!r})"
    more = f" [and {exc.error_count() - 1} more]" if exc.error_count() > 1 else ""
    return f"{where}{key}: {error['msg']}{shown}{more}"
