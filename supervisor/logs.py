"""Structured logs: JSON lines to a file, readable console output on a terminal.

Everything goes through the standard ``logging`` module with structlog's
processors, so records from any thread (worker output readers included) end
up in the same two places.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

import structlog

LOG_FILE = "node-supervisor.jsonl"

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def setup_logging(level: str = "info", log_dir: Path | None = None, console_format: str = "auto") -> Path | None:
    """Configure logging once per process; return the JSON log file's path, if any."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())

    use_console = console_format == "console" or (console_format == "auto" and sys.stderr.isatty())
    console_renderer: Any = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if use_console else structlog.processors.JSONRenderer()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_formatter(console_renderer))
    root.addHandler(console)

    log_file = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / LOG_FILE
        # WatchedFileHandler reopens the file after logrotate moves it.
        file_handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(_formatter(structlog.processors.JSONRenderer()))
        root.addHandler(file_handler)
    return log_file


def _formatter(renderer: Any) -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
