"""Structured logs: JSON lines to a file, readable console output on a terminal.

Everything goes through the standard ``logging`` module with structlog's
processors, so records from any thread (worker output readers included) end
up in the same two places.  The daemon is the file's only writer (workers'
output reaches it through the daemon), so it rotates the file itself, by size.
"""

from __future__ import annotations

import logging
import os
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


def setup_logging(
    level: str = "info", log_dir: Path | None = None, console_format: str = "auto", max_bytes: int = 0, backups: int = 0
) -> Path | None:
    """Configure logging once per process; return the JSON log file's path, if any.

    ``max_bytes`` > 0 rotates the file at that size, keeping ``backups`` old files.
    """
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
    json_lines = _JsonLines()  # one instance for both handlers: a record is rendered once
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(
        _formatter(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())) if use_console else json_lines
    )
    root.addHandler(console)

    log_file = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / LOG_FILE
        file_handler = RotatingLogFile(log_file, max_bytes, backups)
        file_handler.setFormatter(json_lines)
        root.addHandler(file_handler)
    return log_file


def backup_path(log_file: Path, number: int) -> Path:
    """The ``number``-th rotated file (1: the newest backup)."""
    return log_file.with_name(f"{log_file.name}.{number}")


class RotatingLogFile(logging.FileHandler):
    """The JSON log file, rotated by size in-process and reopened when moved from outside.

    A record that would take the file past ``max_bytes`` (0: never) is written
    to a new file after the full one becomes ``<name>.1`` (``.1`` becomes
    ``.2``, and so on; the oldest beyond ``backups`` is removed; with no
    backups the full file is removed).  Records are whole lines, written under
    the handler's lock, so no line is split across files.  A file that
    logrotate (or anyone) moved or removed is reopened, as WatchedFileHandler
    would.
    """

    def __init__(self, path: Path, max_bytes: int = 0, backups: int = 0) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.max_bytes, self.backups = max_bytes, backups
        self._identity = self._opened_identity()
        self._bytes = self._size()  # what the file holds, counted as written rather than asked of the kernel per line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            if self.stream is None or self._moved():  # closed (at exit), or logrotate moved it
                self._reopen()
            length = len(line.encode("utf-8"))
            if self.max_bytes > 0 and 0 < self._bytes and self._bytes + length > self.max_bytes:
                self._rotate()
            self.stream.write(line)
            self._bytes += length
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own convention: report on stderr, go on
            self.handleError(record)

    def _size(self) -> int:
        return os.fstat(self.stream.fileno()).st_size

    def _opened_identity(self) -> tuple[int, int]:
        stat = os.fstat(self.stream.fileno())
        return stat.st_dev, stat.st_ino

    def _moved(self) -> bool:
        try:
            stat = os.stat(self.baseFilename)
        except FileNotFoundError:
            return True
        return (stat.st_dev, stat.st_ino) != self._identity

    def _rotate(self) -> None:
        self.stream.close()
        current = Path(self.baseFilename)
        try:
            if self.backups == 0:
                current.unlink(missing_ok=True)
            else:
                for number in range(self.backups - 1, 0, -1):
                    if backup_path(current, number).exists():
                        os.replace(backup_path(current, number), backup_path(current, number + 1))
                os.replace(current, backup_path(current, 1))
        finally:  # a rename that failed leaves the file where it is: logging goes on in it
            self._reopen()

    def _reopen(self) -> None:
        if self.stream is not None and not self.stream.closed:
            self.stream.close()
        self.stream = self._open()
        self._identity = self._opened_identity()
        self._bytes = self._size()


def _formatter_settings(renderer: Any) -> dict[str, Any]:
    return {
        "foreign_pre_chain": _SHARED,
        "processors": [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    }


def _formatter(renderer: Any) -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(**_formatter_settings(renderer))


class _JsonLines(structlog.stdlib.ProcessorFormatter):
    """The JSON line of a record, rendered once however many handlers write it (stderr and the file)."""

    def __init__(self) -> None:
        super().__init__(**_formatter_settings(structlog.processors.JSONRenderer()))

    def format(self, record: logging.LogRecord) -> str:
        line = record.__dict__.get("_json_line")
        if line is None:
            line = record.__dict__["_json_line"] = super().format(record)
        return line


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
