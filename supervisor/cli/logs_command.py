"""`node-supervisor logs`: the daemon's JSON log, filtered, as readable lines or as it is."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import deque
from typing import Any, Iterable, Iterator

from workers.protocol import ExitCode

from ..config import Settings
from ..logs import LOG_FILE
from ..logs_reader import LogFilter, follow_lines, log_files, parse_record, read_lines

FOLLOW_HISTORY = 10  # lines of the past `logs -f` shows first, unless -n says
_SHOWN_FIRST = ("timestamp", "level", "logger", "event")
_PLAIN_VALUE = re.compile(r"^[^\s\"'=]+$")
_MICROSECONDS = re.compile(r"(\.\d{3})\d*(?=Z$|[+-]\d\d:\d\d$)")


def logs_command(settings: Settings, args: argparse.Namespace) -> int:
    log_dir = settings.log_dir or settings.state_dir / "logs"
    if not log_dir.is_dir():
        print(
            f"node-supervisor: no log directory at {log_dir} (the daemon creates it when it runs; see log_dir)",
            file=sys.stderr,
        )
        return ExitCode.NO_INPUT
    log_file = log_dir / LOG_FILE
    if not args.follow and not log_files(log_file):
        print(f"node-supervisor: no log files in {log_dir}", file=sys.stderr)
        return ExitCode.NO_INPUT
    selected = LogFilter(
        engine=args.engine, worker=args.worker, request=args.request, level=args.level, since=args.since
    )
    newer_than = args.since.timestamp() if args.since else None
    out = sys.stdout.buffer
    # As tail and journalctl: following starts with the last 10 lines; -n chooses how many (-n 0: none).
    last = args.lines if args.lines is not None else (FOLLOW_HISTORY if args.follow else None)

    def tail(lines: Iterator[bytes]) -> Iterable[bytes]:
        if last is None:
            return lines
        return deque((line for line in lines if selected.matches(parse_record(line))), maxlen=last)

    try:
        if args.follow:
            lines = follow_lines(log_file, stop=lambda: False, idle=out.flush, newer_than=newer_than, history=tail)
        else:
            lines = iter(tail(read_lines(log_file, newer_than=newer_than)))
        for line in lines:
            record = parse_record(line)
            if selected.matches(record):
                out.write(
                    line + b"\n"
                    if args.json or record is None
                    else format_record(record).encode("utf-8", "replace") + b"\n"
                )
        out.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `logs | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return ExitCode.OK


def format_record(record: dict[str, Any]) -> str:
    """One line: time, level, logger, event, then key=value for every other field."""
    stamp = _MICROSECONDS.sub(r"\1", str(record.get("timestamp", "-")))
    head = f"{stamp} {str(record.get('level', '-')):<7} {record.get('logger', '-')} {_one_line(str(record.get('event', '')))}"
    fields = " ".join(f"{key}={_value(value)}" for key, value in record.items() if key not in _SHOWN_FIRST)
    return f"{head}  {fields}" if fields else head


def _value(value: Any) -> str:
    if isinstance(value, str) and _PLAIN_VALUE.match(value):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _one_line(text: str) -> str:
    return text.replace("\n", "\\n")
