"""Reading the daemon's JSON log: the current file and its rotated backups, oldest first,
filtered, and followed across rotations (``node-supervisor logs``).

Files are read as bytes and lines handed on without their newline, so a tool
reading them gets exactly what the daemon wrote.  Following keeps the file it
reads open: when the file is rotated (renamed to ``.1``, a new one created)
the open file is read to its end before the files that came after it, so no
line is lost or read twice, even when several rotations passed between two
looks.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Generator, Iterable, Iterator

LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40, "critical": 50}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_CHUNK = 1 << 20
Identity = tuple[int, int]  # (device, inode): a file, whatever its name now


def log_files(log_file: Path) -> list[Path]:
    """The rotated backups (``<file>.N`` ... ``<file>.1``) and the current file, oldest first."""
    numbered = []
    for path in log_file.parent.glob(f"{log_file.name}.*"):
        suffix = path.name[len(log_file.name) + 1 :]
        if suffix.isdigit() and path.is_file():
            numbered.append((int(suffix), path))
    files = [path for _, path in sorted(numbered, reverse=True)]
    return files + [log_file] if log_file.is_file() else files


def parse_since(text: str, now: float) -> datetime:
    """``10m``, ``2h``, ``1d`` (s, m, h, d, w) before ``now``, or an ISO time (without a zone: local time)."""
    relative = _RELATIVE.match(text.strip())
    if relative:
        return datetime.fromtimestamp(now - float(relative.group(1)) * _UNIT_SECONDS[relative.group(2)], timezone.utc)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a time like 2025-06-01T12:00 nor an age like 10m, 2h, 1d") from None
    return moment if moment.tzinfo else moment.astimezone()


def parse_record(line: bytes) -> dict[str, Any] | None:
    """The JSON object a line holds, or None for anything else."""
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, not UTF-8
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class LogFilter:
    """Which records to show; the fields are those the daemon logs (engine, worker_id, request_id)."""

    engine: str | None = None
    worker: str | None = None
    request: str | None = None
    level: str | None = None  # this level and above
    since: datetime | None = None

    @property
    def selects(self) -> bool:
        return any(value is not None for value in (self.engine, self.worker, self.request, self.level, self.since))

    def matches(self, record: dict[str, Any] | None) -> bool:
        """A line that is not a record passes only when nothing is selected."""
        if record is None:
            return not self.selects
        worker_id = str(record.get("worker_id", ""))
        if self.engine is not None and record.get("engine", worker_id.rpartition(".")[0]) != self.engine:
            return False  # a line naming only a worker (ENGINE.N) is that engine's
        if self.worker is not None and worker_id != self.worker:
            return False
        if self.request is not None and record.get("request_id") != self.request:
            return False
        if (
            self.level is not None
            and LEVELS.get(str(record.get("level", "")).lower(), LEVELS["info"]) < LEVELS[self.level]
        ):
            return False
        return self.since is None or _timestamp(record) >= self.since


def _timestamp(record: dict[str, Any]) -> datetime:
    try:
        moment = datetime.fromisoformat(str(record.get("timestamp")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class _Open:
    """One log file being read: its handle, what it is, the unfinished line at its end."""

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path, self.handle = path, handle
        stat = os.fstat(handle.fileno())
        self.identity: Identity = (stat.st_dev, stat.st_ino)
        self.mtime = stat.st_mtime
        self.partial = b""

    def lines(self, final: bool) -> Iterator[bytes]:
        """The complete lines written since the last call; ``final``: the file is done, its last bytes too."""
        if os.fstat(self.handle.fileno()).st_size < self.handle.tell():  # truncated in place (copytruncate)
            self.handle.seek(0)
            self.partial = b""
        while chunk := self.handle.read(_CHUNK):
            *complete, self.partial = (self.partial + chunk).split(b"\n")
            yield from complete
        if final and self.partial:
            yield self.partial
            self.partial = b""

    def close(self) -> None:
        self.handle.close()


def _identity(path: Path) -> Identity | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _listed(log_file: Path) -> list[tuple[Path, Identity | None]]:
    return [(path, _identity(path)) for path in log_files(log_file)]


def _open_all(log_file: Path) -> list[_Open] | None:
    """Every log file open at once, oldest first; None when a rotation ran meanwhile.

    The files are listed again after opening them: the same names on the same
    files then, or the listing (not atomic) may have missed one mid-rotation.
    """
    listed = _listed(log_file)
    opened = []
    for path, _ in listed:
        try:
            opened.append(_Open(path, open(path, "rb")))
        except OSError:
            break
    if [(item.path, item.identity) for item in opened] == listed == _listed(log_file):
        return opened
    for item in opened:
        item.close()
    return None


def _open_current(log_file: Path, stop: Callable[[], bool], poll_s: float) -> list[_Open] | None:
    """Every log file open, oldest first, once the current one exists; None if stopped first."""
    while not stop():
        opened = _open_all(log_file)
        if opened and opened[-1].path == log_file:
            return opened
        for item in opened or []:
            item.close()
        time.sleep(poll_s)
    return None


def read_lines(log_file: Path, newer_than: float | None = None) -> Iterator[bytes]:
    """Every line of the log files as they are now, oldest first (rotated files older than ``newer_than`` skipped)."""
    opened = None
    while opened is None:  # a rotation while opening: again
        opened = _open_all(log_file)
    for item in opened:
        if newer_than is None or item.mtime >= newer_than or item is opened[-1]:
            yield from item.lines(final=True)
        item.close()


def follow_lines(
    log_file: Path,
    stop: Callable[[], bool],
    idle: Callable[[], None] = lambda: None,
    poll_s: float = 0.1,
    newer_than: float | None = None,
    history: Callable[[Iterator[bytes]], Iterable[bytes]] = lambda lines: lines,
) -> Iterator[bytes]:
    """Every line of the log, oldest first, then every line written after, until ``stop()``.

    ``history`` chooses from the lines already written when following began
    (e.g. the last ten, as ``tail -f``); every line written after follows.
    ``idle`` is called before each wait for more.  When the current file is
    rotated away, the rest of it is read, then the files that came after it.
    """
    opened = _open_current(log_file, stop, poll_s)
    if opened is None:
        return
    *older, current = opened

    def written() -> Iterator[bytes]:
        for item in older:
            if newer_than is None or item.mtime >= newer_than:
                yield from item.lines(final=True)
            item.close()
        yield from current.lines(final=False)  # up to its end now

    yield from history(written())
    try:
        while not stop():
            # Looked at before reading: every line written to a file before its rotation is then read.
            rotated = _identity(log_file) != current.identity
            yield from current.lines(final=False)
            if not rotated:
                idle()
                time.sleep(poll_s)
                continue
            moved_to = yield from _next_file(log_file, current, stop, poll_s)
            if moved_to is None:
                return
            current = moved_to
    finally:
        current.close()


def _next_file(
    log_file: Path, current: _Open, stop: Callable[[], bool], poll_s: float
) -> Generator[bytes, None, _Open | None]:
    """After ``log_file`` stopped being ``current``: the rest of it, then the files written
    after it, oldest first; returns the new current file, open (None if stopped).

    ``current`` is found among the rotated files by what it is, not by its name;
    where it is gone (removed, or renamed by another scheme) every file there is
    came after it.
    """
    opened = _open_current(log_file, stop, poll_s)
    if opened is None:
        return None
    identities = [item.identity for item in opened]
    if identities[-1] == current.identity:  # not rotated after all (the name was missing a moment)
        for item in opened:
            item.close()
        return current
    yield from current.lines(final=True)
    current.close()
    start = identities.index(current.identity) + 1 if current.identity in identities else 0
    for item in opened[:start]:
        item.close()
    *done, newest = opened[start:]
    for item in done:
        yield from item.lines(final=True)
        item.close()
    return newest
