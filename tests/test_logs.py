"""The daemon's JSON log: rotated by size in-process, read back and followed by `node-supervisor logs`."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest

from supervisor.cli import main
from supervisor.io.worker_process import parse_worker_line
from supervisor.logs import LOG_FILE, backup_path, get_logger, setup_logging
from supervisor.logs_reader import follow_lines, log_files
from workers.llamacpp.log import logging_level
from workers.protocol import ExitCode

from .conftest import CLI, collect, fake_engine, wait_until


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """setup_logging configures the whole process: put the test runner's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def numbers_in(path: Path) -> list[int]:
    return [json.loads(line)["n"] for line in path.read_text().splitlines()]


def test_the_file_rotates_at_its_size_and_keeps_n_backups(tmp_path, logging_restored):
    log_file = setup_logging("info", tmp_path, "json", max_bytes=4096, backups=3)
    log = get_logger("test.rotation")
    for n in range(400):
        log.info("numbered", n=n, padding="x" * 100)
    assert log_file is not None
    files = log_files(log_file)
    assert files == [backup_path(log_file, 3), backup_path(log_file, 2), backup_path(log_file, 1), log_file]
    assert all(path.stat().st_size <= 4096 for path in files)
    assert not backup_path(log_file, 4).exists()
    kept = [n for path in files for n in numbers_in(path)]  # every line whole JSON, oldest file first
    assert kept == list(range(kept[0], 400)) and kept[0] > 0
    longest = max(len(line) for path in files for line in path.read_bytes().splitlines(keepends=True))
    assert all(path.stat().st_size > 4096 - longest for path in files[:-1])  # full: the next line did not fit


def test_with_no_backups_the_full_file_is_started_anew(tmp_path, logging_restored):
    log_file = setup_logging("info", tmp_path, "json", max_bytes=2048, backups=0)
    assert log_file is not None
    log = get_logger("test.no_backups")
    for n in range(100):
        log.info("numbered", n=n, padding="x" * 100)
    assert log_files(log_file) == [log_file] and log_file.stat().st_size <= 2048
    kept = numbers_in(log_file)
    assert kept == list(range(kept[0], 100)) and kept[0] > 0


def test_no_rotation_at_zero_bytes_and_a_moved_file_is_reopened(tmp_path, logging_restored):
    """max_bytes 0 leaves rotation to logrotate, as before: the daemon reopens a file moved away."""
    log_file = setup_logging("info", tmp_path, "json", max_bytes=0, backups=3)
    assert log_file is not None
    log = get_logger("test.external")
    for n in range(100):
        log.info("numbered", n=n, padding="x" * 100)
    log_file.rename(tmp_path / "moved-by-logrotate")
    log.info("numbered", n=100)
    assert numbers_in(tmp_path / "moved-by-logrotate") == list(range(100))
    assert numbers_in(log_file) == [100] and not backup_path(log_file, 1).exists()


def test_the_daemon_rotates_its_log_at_log_max_bytes(make_daemon, tmp_path):
    engine, _ = fake_engine(tmp_path)
    daemon = make_daemon(
        {"f": engine}, log_max_bytes=2048, log_backups=2, supervision={"probe_interval_s": 0}
    )  # no probes: a quiet log
    client = daemon.client()
    for _ in range(12):  # each request is one "request end" line of about 350 bytes
        assert collect(client.generate(prompt="hi", max_tokens=2))[1]["event"] == "done"
    log_file = daemon.state_dir / "logs" / LOG_FILE
    files = wait_until(
        lambda: len(log_files(log_file)) == 3 and log_files(log_file), 30, "two rotated files and the current one"
    )
    assert all(0 < path.stat().st_size <= 2048 for path in files) and not backup_path(log_file, 3).exists()
    result = subprocess.run(
        [*CLI, "--config", str(daemon.config_path), "logs", "--json"], capture_output=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout == b"".join(path.read_bytes() for path in files)
    worker_id = daemon.engine("f")["workers"][0]["id"]
    result = subprocess.run(
        [*CLI, "--config", str(daemon.config_path), "logs", "--worker", worker_id],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    assert all(f"worker_id={worker_id}" in line for line in result.stdout.splitlines())


def test_follow_reads_every_line_once_in_order_while_the_file_rotates(tmp_path, logging_restored):
    """A writer thread logs through the real setup_logging into small files (over a hundred
    rotations, often several between two looks of the reader); `logs -f` prints every
    number once, in order."""
    total = 2000
    log_file = setup_logging("info", tmp_path / "logs", "json", max_bytes=4096, backups=50)
    assert log_file is not None
    log = get_logger("test.follow")
    log.info("before the reader")
    reader = subprocess.Popen(
        [*CLI, "--state-dir", str(tmp_path), "logs", "-f", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    received: list[dict[str, Any]] = []
    threading.Thread(
        target=lambda: received.extend(json.loads(line) for line in reader.stdout or []), daemon=True
    ).start()

    def write() -> None:
        for n in range(total):
            # Never more than 400 lines (about 24 files) ahead of the reader: the 50 backups still hold them.
            wait_until(lambda: n - len(received) < 400, 30, f"the reader within 400 lines of line {n}")
            log.info("numbered", n=n, padding="x" * 100)

    writer = threading.Thread(target=write)
    try:
        wait_until(lambda: received, 30, "the reader's first line")
        writer.start()
        wait_until(lambda: len(received) >= total + 1, 60, f"all {total} numbered lines read")
    finally:
        reader.terminate()
        _, stderr = reader.communicate(timeout=30)
        if writer.is_alive():
            writer.join(timeout=60)
    assert "Traceback" not in stderr.decode()
    assert len(log_files(log_file)) == 51, "the file rotated more than 50 times"
    assert [r["event"] for r in received[:1]] == ["before the reader"]
    assert [r["n"] for r in received[1:]] == list(range(total))


def test_follow_finds_its_way_through_several_rotations_between_two_looks(tmp_path, logging_restored):
    """The reader's file is rotated a dozen times while it waits: it finishes that file,
    then reads the ones that came after it, oldest first, then follows the new one."""
    log_file = setup_logging("info", tmp_path, "json", max_bytes=1024, backups=30)
    assert log_file is not None
    log = get_logger("test.rotations")
    for n in range(3):
        log.info("numbered", n=n, padding="x" * 100)
    looks = []

    def while_the_reader_waits() -> None:
        looks.append(len(log_files(log_file)))
        if len(looks) == 1:
            for n in range(3, 60):
                log.info("numbered", n=n, padding="x" * 100)

    lines = follow_lines(
        log_file, stop=lambda: len(looks) >= 2, idle=while_the_reader_waits, poll_s=0.01
    )  # the second look ends it
    assert [json.loads(line)["n"] for line in lines] == list(range(60))
    assert looks[0] == 1 and looks[1] > 12, looks  # one file at the first look; many after it


def record(moment: datetime, level: str, event: str, **fields: Any) -> dict[str, Any]:
    stamp = moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"event": event, **fields, "level": level, "logger": "supervisor.test", "timestamp": stamp}


@pytest.fixture
def known_log(tmp_path) -> tuple[Path, bytes]:
    """A state directory whose log holds known records (a rotated file and the current one) and garbage."""
    now = datetime.now(timezone.utc)
    older = [
        record(now - timedelta(hours=3), "info", "worker started", engine="llama", worker_id="llama.1", pid=10),
        record(
            now - timedelta(hours=2),
            "debug",
            "worker.output line",
            engine="llama",
            worker_id="llama.1",
            source="llama.cpp",
        ),
    ]
    newer = [
        record(
            now - timedelta(minutes=20),
            "warning",
            "retrying request after worker exit",
            request_id="r-1",
            engine="exl2",
        ),
        record(
            now - timedelta(minutes=5),
            "info",
            "request end",
            request_id="r-1",
            engine="exl2",
            worker_id="exl2.4",
            tokens=12,
        ),
        record(now - timedelta(minutes=1), "error", "worker did not exit after SIGKILL", worker_id="llama.2", pid=11),
    ]
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    rotated = b"".join(json.dumps(r).encode() + b"\n" for r in older)
    current = (
        json.dumps(newer[0], ensure_ascii=False).encode()
        + b"\n"
        + b"not json at all \xff\xfe\n"
        + b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in newer[1:])
        + b'[1, 2]\n{"half a record"\n'
    )
    (log_dir / f"{LOG_FILE}.1").write_bytes(rotated)
    (log_dir / LOG_FILE).write_bytes(current)
    return tmp_path, rotated + current


def run_logs(state_dir: Path, capsysbinary: Any, *flags: str) -> list[str]:
    assert main(["--state-dir", str(state_dir), "logs", *flags]) == ExitCode.OK
    return capsysbinary.readouterr().out.decode("utf-8", "replace").splitlines()


def events_of(lines: list[str]) -> list[str]:
    return [json.loads(line)["event"] for line in lines]


def test_json_passes_every_line_through_byte_for_byte(known_log, capsysbinary):
    state_dir, written = known_log
    assert main(["--state-dir", str(state_dir), "logs", "--json"]) == ExitCode.OK
    assert capsysbinary.readouterr().out == written


def test_readable_lines_and_garbage_shown_as_it_is(known_log, capsysbinary):
    lines = run_logs(known_log[0], capsysbinary)
    assert len(lines) == 8
    first = lines[0].split()
    assert first[1:5] == ["info", "supervisor.test", "worker", "started"]
    assert first[0].endswith("Z") and len(first[0]) == len("2025-01-01T00:00:00.000Z")
    assert lines[0].endswith("engine=llama worker_id=llama.1 pid=10")
    assert lines[4].endswith("request end  request_id=r-1 engine=exl2 worker_id=exl2.4 tokens=12")
    assert lines[3].startswith("not json at all") and lines[6:] == ["[1, 2]", '{"half a record"']


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            ["--engine", "llama"],
            ["worker started", "worker.output line", "worker did not exit after SIGKILL"],
        ),  # llama.2 names no engine
        (["--worker", "llama.1"], ["worker started", "worker.output line"]),
        (["--request", "r-1"], ["retrying request after worker exit", "request end"]),
        (["--level", "warning"], ["retrying request after worker exit", "worker did not exit after SIGKILL"]),
        (["--level", "debug", "--engine", "exl2"], ["retrying request after worker exit", "request end"]),
        (
            ["--since", "30m"],
            ["retrying request after worker exit", "request end", "worker did not exit after SIGKILL"],
        ),
        (
            ["--since", "150m", "--level", "info"],
            ["retrying request after worker exit", "request end", "worker did not exit after SIGKILL"],
        ),
    ],
)
def test_filters_select_on_the_fields_the_daemon_logs(known_log, capsysbinary, flags, expected):
    """Garbage lines cannot match a filter: with one, they are left out."""
    assert events_of(run_logs(known_log[0], capsysbinary, "--json", *flags)) == expected


def test_since_takes_an_iso_time(known_log, capsysbinary):
    moment = (datetime.now() - timedelta(minutes=10)).replace(microsecond=0)  # local time, no zone
    assert events_of(run_logs(known_log[0], capsysbinary, "--json", "--since", moment.isoformat())) == [
        "request end",
        "worker did not exit after SIGKILL",
    ]
    assert events_of(
        run_logs(known_log[0], capsysbinary, "--json", "--since", "2000-01-01T00:00:00+00:00", "--level", "error")
    ) == ["worker did not exit after SIGKILL"]


def test_missing_log_directory_and_bad_since_say_so_in_one_line(tmp_path):
    result = subprocess.run(
        [*CLI, "--state-dir", str(tmp_path / "none"), "logs"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == ExitCode.NO_INPUT and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and str(tmp_path / "none" / "logs") in result.stderr
    result = subprocess.run(
        [*CLI, "--state-dir", str(tmp_path), "logs", "--since", "yesterday"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "--since" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "level, line, expected",
    [
        (2, "llama_model_loader: - kv  20:   tokenizer.ggml.tokens arr[str,262144]  = [...]", logging.DEBUG),
        (2, "print_info: n_head                = 4", logging.DEBUG),
        (2, "load: special tokens cache size = 6414", logging.DEBUG),
        (2, "llama_context: n_seq_max             = 1", logging.DEBUG),
        (2, "llama_model_loader: loaded meta data with 33 key-value pairs and 236 tensors from /m.gguf", logging.INFO),
        (2, "print_info: file size   = 235.16 MiB (7.36 BPW)", logging.INFO),
        (2, "load_tensors: offloaded 19/19 layers to GPU", logging.INFO),
        (2, "llama_kv_cache:      CUDA0 KV buffer size =    36.00 MiB", logging.INFO),
        (2, "llama_context: n_ctx                 = 2048", logging.INFO),
        (3, "load: control-looking token:    212 '</s>' was not control-type", logging.WARNING),
        (4, "llama_model_load: error loading model", logging.ERROR),
        (1, "llama_graph_n_input_tensors: 9", logging.DEBUG),
    ],
)
def test_llama_cpp_lines_keep_their_level_and_load_detail_is_debug(level, line, expected):
    assert logging_level(level, line) == expected


def test_worker_lines_are_logged_at_the_level_the_worker_gave():
    assert parse_worker_line("DEBUG llama.cpp: print_info: n_head = 4") == (
        logging.DEBUG,
        "llama.cpp",
        "print_info: n_head = 4",
    )
    assert parse_worker_line("WARNING worker: slow") == (logging.WARNING, "worker", "slow")
    assert parse_worker_line("Traceback (most recent call last):") == (
        logging.INFO,
        None,
        "Traceback (most recent call last):",
    )
    assert parse_worker_line('  File "x.py", line 1') == (logging.INFO, None, '  File "x.py", line 1')
