"""Start-up failures: the real `node-supervisor run` stops with one line naming the
problem and an exit code systemd can act on (78 config, 75 in use), never a traceback,
and never takes over another live daemon's sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.client import Client, ClientTimeout

from .conftest import CLI, TEST_STATE, toml_value

FAKE = {"kind": "fake", "priority": 10}


def write_config(
    directory: Path, engines: dict[str, dict[str, Any]] | None = None, raw: str = "", **settings: Any
) -> Path:
    """A config like conftest's Daemon writes: shared envs and data, no env creation."""
    settings.setdefault("state_dir", directory / "state")
    settings.setdefault("models_dir", [])  # the shared data directory's model is not discovered (as conftest's)
    lines = [
        f"data_dir = {toml_value(TEST_STATE / 'data')}",
        f"envs_dir = {toml_value(TEST_STATE / 'envs')}",
        'log_format = "json"',
        "create_envs = false",
        *(f"{key} = {toml_value(value)}" for key, value in settings.items()),
        raw,
    ]
    for name, engine in (engines if engines is not None else {"f": FAKE}).items():
        lines.append(f"[engines.{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in engine.items()]
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def clean_environ(**extra: str) -> dict[str, str]:
    """The test's environment without NODESUP_* settings (they would add warnings or change the config)."""
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("NODESUP_")}
    return {**environ, **extra}


def run_cli(config: Path, timeout: float = 30.0, **environ: str) -> subprocess.CompletedProcess[str]:
    """`run` with this config; a daemon that starts instead of failing fails the test at the deadline."""
    try:
        return subprocess.run(
            [*CLI, "--config", str(config), "run", "--no-create-envs"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_environ(**environ),
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        pytest.fail(f"the daemon did not exit within {timeout}s; stderr ends:\n{(stderr or '')[-2000:]}")


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def ping(endpoint: str, timeout: float = 30.0) -> dict[str, Any]:
    """Ping until the daemon answers or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with Client(endpoint, timeout_s=2.0) as client:
                return client.ping()
        except ClientTimeout:
            if time.monotonic() > deadline:
                raise


def stale_socket(path: Path) -> None:
    """A socket file nothing listens on: what a killed daemon leaves behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    assert path.is_socket()


# --- 78: configuration ---------------------------------------------------------


def _state_dir_cases(tmp: Path) -> list[Path]:
    (tmp / "a-file").write_text("")
    cases = [tmp / "a-file", tmp / "a-file" / "state"]  # a file; a path under a file (even root cannot create it)
    if Path("/proc/1").is_dir():
        cases.append(Path("/proc/1"))  # a directory nobody, root included, can write in
    return cases


def test_state_dir_not_a_writable_directory_exits_78(tmp_path):
    for index, state_dir in enumerate(_state_dir_cases(tmp_path)):
        directory = tmp_path / f"case{index}"
        directory.mkdir()
        result = run_cli(write_config(directory, state_dir=state_dir))
        assert_one_line(result, 78, "state_dir", str(state_dir))


def test_config_file_not_utf8_exits_78_naming_the_file(tmp_path):
    path = write_config(tmp_path)
    path.write_bytes(path.read_bytes() + b'# caf\xe9 in latin-1\nlog_level = "info"\n')
    assert_one_line(run_cli(path), 78, str(path), "UTF-8")


def test_malformed_pip_args_variable_exits_78_naming_the_key(tmp_path):
    result = run_cli(write_config(tmp_path), NODESUP_PIP_ARGS="--index-url https://example.invalid")
    assert_one_line(result, 78, "pip_args", "NODESUP_PIP_ARGS")


def test_empty_engines_table_exits_78(tmp_path):
    result = run_cli(write_config(tmp_path, engines={}, raw="engines = {}"))
    assert_one_line(result, 78, "engines", "at least one engine")


def test_tcp_port_in_use_exits_78_naming_the_key(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(write_config(tmp_path, events_endpoint=f"tcp://127.0.0.1:{port}"))
    assert_one_line(result, 78, "events_endpoint", str(port))


# --- real daemons --------------------------------------------------------------


@pytest.mark.parametrize(
    "key, socket_name",
    [("client_endpoint", "client.sock"), ("events_endpoint", "events.sock"), ("worker_endpoint", "workers.sock")],
)
def test_second_daemon_on_a_live_endpoint_exits_75_and_leaves_it(make_daemon, tmp_path, key, socket_name):
    first = make_daemon({"f": FAKE})
    taken = first.state_dir / "run" / socket_name
    inode = taken.stat().st_ino
    result = run_cli(write_config(tmp_path, **{key: f"ipc://{taken}"}))
    assert_one_line(result, 75, key, str(taken))
    assert taken.stat().st_ino == inode  # the live socket file was not replaced
    assert ping(first.endpoint, timeout=5.0)["event"] == "pong"
    assert first.process is not None and first.process.poll() is None


def test_stale_socket_file_is_removed_and_the_daemon_starts(make_daemon):
    daemon = make_daemon({"f": FAKE}, start=False)
    socket_path = daemon.state_dir / "run" / "client.sock"
    stale_socket(socket_path)
    daemon.start()
    assert ping(daemon.endpoint)["event"] == "pong"
    assert "removed a stale socket file" in daemon.log_text() and str(socket_path) in daemon.log_text()


def test_unknown_environment_variable_is_logged_at_start(make_daemon, monkeypatch):
    monkeypatch.setenv("NODESUP_LOGLEVEL", "debug")
    daemon = make_daemon({"f": FAKE})
    assert ping(daemon.endpoint)["event"] == "pong"
    warnings = [line for line in daemon.log_text().splitlines() if "NODESUP_LOGLEVEL" in line]
    assert warnings and '"warning"' in warnings[0], daemon.log_tail()
