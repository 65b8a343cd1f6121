"""The Windows service's control flow, on Linux, with fakes of the pywin32 modules.

None of these tests runs on Windows or calls Windows: tests/winservice_fakes.py
stands in for win32service, win32serviceutil, servicemanager, winerror,
win32job, win32api and win32con, and drives the service as the service
control manager would.  The daemon inside is the real one, in this process,
with a fake engine's real worker processes and loopback TCP endpoints (the
endpoints a Windows node uses).
"""

from __future__ import annotations

import importlib
import json
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

import supervisor.io.job_object as job_object
import winservice.runner
from supervisor.client import Client, ClientTimeout, CurveKeys
from supervisor.config import ConfigError
from supervisor.node.envs import EnvError
from winservice.paths import load_service_settings
from workers.protocol import ExitCode

from .conftest import fake_engine, toml_value, wait_until
from .winservice_fakes import (
    ERROR_SERVICE_SPECIFIC_ERROR,
    JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
    PYS_SERVICE_STARTED,
    PYS_SERVICE_STARTING,
    PYS_SERVICE_STOPPED,
    SERVICE_CONTROL_INTERROGATE,
    SERVICE_CONTROL_STOP,
    SERVICE_RUNNING,
    SERVICE_START_PENDING,
    SERVICE_STOP_PENDING,
    SERVICE_STOPPED,
    FakeScm,
    Windows,
    fake_modules,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> Iterator[Windows]:
    """The fake pywin32 modules in sys.modules, job objects switched on, the service module imported against them."""
    recorded = Windows()
    for name, module in fake_modules(recorded).items():
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules.pop("winservice.service", None)  # imported afresh, against these fakes
    monkeypatch.setattr(job_object, "USE_JOB_OBJECTS", True)
    monkeypatch.setattr(job_object, "_job", None)
    yield recorded
    sys.modules.pop("winservice.service", None)


@pytest.fixture
def programdata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """%ProgramData% in a temporary directory; the daemon's logging set back afterwards (it runs in this process)."""
    monkeypatch.setenv("PROGRAMDATA", str(tmp_path / "ProgramData"))
    for name in ("NODESUP_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield tmp_path / "ProgramData" / "node-supervisor"
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(app_dir: Path, lines: list[str], engines: dict[str, dict[str, Any]] | None = None) -> Path:
    app_dir.mkdir(parents=True, exist_ok=True)
    for name, engine in (engines or {}).items():
        lines += [f"[engines.{name}]", *(f"{key} = {toml_value(value)}" for key, value in engine.items())]
    path = app_dir / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def serving_config(app_dir: Path, shared_state: dict[str, Path], tmp_path: Path) -> str:
    """A fake engine on loopback TCP; state_dir and data_dir left to the service's %ProgramData% defaults."""
    client_endpoint = f"tcp://127.0.0.1:{free_port()}"
    lines = [
        f"envs_dir = {toml_value(shared_state['envs_dir'])}",
        "create_envs = false",
        'log_format = "json"',
        f"client_endpoint = {toml_value(client_endpoint)}",
        f'events_endpoint = "tcp://127.0.0.1:{free_port()}"',
        'worker_endpoint = "tcp://127.0.0.1:*"',
        "shutdown_grace_s = 2.0",
    ]
    write_config(app_dir, lines, {"f": fake_engine(tmp_path)[0]})
    return client_endpoint


def local_keys(app_dir: Path) -> CurveKeys | None:
    """This node's own client keys, which the daemon writes under its state directory when it first serves tcp."""
    keys = app_dir / "state" / "keys"
    if not (keys / "server.key").is_file() or not (keys / "clients" / "local.key_secret").is_file():
        return None
    return CurveKeys.from_files(keys / "server.key", keys / "clients" / "local.key_secret")


def engine_status(endpoint: str, app_dir: Path) -> dict[str, Any] | None:
    curve = local_keys(app_dir)
    if curve is None:
        return None
    try:
        with Client(endpoint, timeout_s=1.0, curve=curve) as client:
            return client.status()["engines"][0]
    except ClientTimeout:
        return None


def log_records(app_dir: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in (app_dir / "state" / "logs" / "node-supervisor.jsonl").read_text().splitlines()
    ]


def start_service(windows: Windows) -> FakeScm:
    service_module = importlib.import_module("winservice.service")
    return FakeScm(service_module.NodeSupervisorService, windows).start()


def test_the_service_reports_running_once_the_daemon_serves_and_a_stop_ends_it_and_its_workers(
    windows, programdata, shared_state, tmp_path
):
    """Start -> daemon serving -> stop -> workers gone, as the service control manager sees it (fakes, on Linux)."""
    endpoint = serving_config(programdata, shared_state, tmp_path)
    scm = start_service(windows)
    engine = wait_until(
        lambda: (s := engine_status(endpoint, programdata)) and s["state"] == "ready" and s,
        60,
        "the fake engine ready behind the service",
    )
    with Client(endpoint, timeout_s=5.0, curve=local_keys(programdata)) as client:
        assert client.ping()["event"] == "pong"
    worker_pids = {w["pid"] for w in engine["workers"] if w["pid"]}
    assert worker_pids and all(psutil.pid_exists(pid) for pid in worker_pids)
    assert windows.states() == [SERVICE_START_PENDING, SERVICE_RUNNING]
    assert windows.logged_ids() == [PYS_SERVICE_STARTING, PYS_SERVICE_STARTED]
    # Every worker went into the one job, which kills them when the service's process ends.
    assert len(windows.jobs) == 1 and windows.jobs[0].kills_on_close
    assert set(windows.jobs[0].pids) == worker_pids and all(handle.closed for handle in windows.handles)

    scm.control(SERVICE_CONTROL_STOP)
    scm.wait_stopped(60)
    assert windows.states() == [SERVICE_START_PENDING, SERVICE_RUNNING, SERVICE_STOP_PENDING, SERVICE_STOPPED]
    assert windows.statuses[-1][3:5] == (0, 0) and scm.process_exit_code is None and scm.error is None
    assert not any(psutil.pid_exists(pid) for pid in worker_pids)
    assert (
        windows.logged_ids() == [PYS_SERVICE_STARTING, PYS_SERVICE_STARTED, PYS_SERVICE_STOPPED]
        and windows.errors() == []
    )
    assert any(kind == "info" and endpoint in message for kind, message in windows.events)
    # The daemon's one ordered stop ran: the stop control's reason, the worker stopped, then the daemon.
    events = [(r["event"], r.get("reason")) for r in log_records(programdata)]
    stop_at, stopped_at = events.index(("stop requested", "service stop")), events.index(("daemon stopped", None))
    assert ("worker exited", None) in events[stop_at:stopped_at] and stopped_at == len(events) - 1


def test_a_stop_before_the_daemon_serves_is_carried_out_as_it_starts_serving(
    windows, programdata, shared_state, tmp_path, monkeypatch
):
    """A stop that arrives while the daemon still prepares (fakes, on Linux): RUNNING is never reported, the daemon stops in order."""
    serving_config(programdata, shared_state, tmp_path)
    stop_sent = threading.Event()
    real_run_daemon = winservice.runner.run_daemon

    def run_daemon_after_the_stop(*args: Any, **kwargs: Any) -> int:
        assert stop_sent.wait(30)
        return real_run_daemon(*args, **kwargs)

    monkeypatch.setattr(winservice.runner, "run_daemon", run_daemon_after_the_stop)
    scm = start_service(windows)
    scm.control(SERVICE_CONTROL_INTERROGATE)  # still starting: pywin32's default answer would be RUNNING
    scm.control(SERVICE_CONTROL_STOP)
    stop_sent.set()
    scm.wait_stopped(60)
    assert windows.states() == [SERVICE_START_PENDING, SERVICE_STOP_PENDING, SERVICE_STOPPED]
    assert windows.statuses[-1][3:5] == (0, 0) and windows.errors() == []
    records = log_records(programdata)
    events = [(r["event"], r.get("reason")) for r in records]
    assert ("stop requested", "service stop") in events and events[-1] == ("daemon stopped", None)
    # A worker whose spawn was under way when the stop came is waited for, not left behind.
    started = [r["pid"] for r in records if r["event"] == "worker started"]
    assert started and not any(psutil.pid_exists(pid) for pid in started)


def test_a_daemon_that_fails_after_serving_is_a_fatal_stop_in_the_event_log_and_to_the_service_manager(
    windows, programdata, shared_state, tmp_path, monkeypatch
):
    """An internal error while running (fakes, on Linux): STOPPED with a service-specific 1, the error in the event log, the traceback in the daemon's log."""
    from supervisor.daemon.app import Daemon

    real_shutdown = Daemon._shutdown

    async def shutdown_then_fail(self: Any) -> None:
        await real_shutdown(self)  # everything closed, so this process can go on to the next test
        raise RuntimeError("event socket broke")

    monkeypatch.setattr(Daemon, "_shutdown", shutdown_then_fail)
    endpoint = serving_config(programdata, shared_state, tmp_path)
    scm = start_service(windows)
    wait_until(
        lambda: SERVICE_RUNNING in windows.states() and engine_status(endpoint, programdata), 60, "the service running"
    )
    scm.control(SERVICE_CONTROL_STOP)
    scm.wait_stopped(60)
    assert windows.states() == [SERVICE_START_PENDING, SERVICE_RUNNING, SERVICE_STOP_PENDING, SERVICE_STOPPED]
    assert (
        windows.statuses[-1][3:5] == (ERROR_SERVICE_SPECIFIC_ERROR, ExitCode.CRASH)
        and scm.process_exit_code == ExitCode.CRASH
    )
    (error,) = windows.errors()
    assert error.startswith(
        "node-supervisor stopped with an error (exit code 1: internal error): RuntimeError: event socket broke"
    )
    assert PYS_SERVICE_STOPPED not in windows.logged_ids()
    failed = [r for r in log_records(programdata) if r["event"] == "the daemon failed"]
    assert len(failed) == 1 and "event socket broke" in failed[0]["exception"]


# Each: the config lines, given a port another process listens on and a scratch directory; the words the event log must say.
START_FAILURES = {
    "invalid value": (lambda port, tmp: ["heartbeat_interval_s = -1"], ["configuration error", "heartbeat_interval_s"]),
    "port taken": (
        lambda port, tmp: [f'client_endpoint = "tcp://127.0.0.1:{port}"'],
        ["configuration error", "client_endpoint", "cannot bind"],
    ),
    # Passes the preflight checks; ZeroMQ's bind itself fails (supervisor.io.transport.BindError).
    "bind fails": (
        lambda port, tmp: [f'client_endpoint = "ipc://{tmp}/missing/client.sock"'],
        ["configuration error", "cannot bind ipc://"],
    ),
}


@pytest.mark.parametrize("case", START_FAILURES)
def test_a_start_that_fails_is_reported_to_the_service_manager_with_the_exit_code_and_why(
    windows, programdata, tmp_path, case
):
    """Bad configuration and bind failures (fakes, on Linux): STOPPED with a service-specific 78, an event-log error saying why."""
    config_lines, expected_words = START_FAILURES[case]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        lines = config_lines(listener.getsockname()[1], tmp_path)
        write_config(
            programdata, [*lines, 'log_format = "json"', "create_envs = false"], {"f": fake_engine(tmp_path)[0]}
        )
        scm = start_service(windows)
        scm.wait_stopped(60)
    assert windows.states() == [SERVICE_START_PENDING, SERVICE_STOPPED]
    assert windows.statuses[-1][3:5] == (ERROR_SERVICE_SPECIFIC_ERROR, ExitCode.CONFIG)
    assert scm.process_exit_code == ExitCode.CONFIG  # the process ends: no second STOPPED report with code 0
    assert len(windows.errors()) == 1 and "did not start (exit code 78" in windows.errors()[0]
    assert all(word in windows.errors()[0] for word in expected_words), windows.errors()
    assert PYS_SERVICE_STARTED not in windows.logged_ids()


def test_environment_builds_keep_the_start_pending_and_a_failed_build_is_reported(
    windows, programdata, tmp_path, monkeypatch
):
    """Each build line is start-up progress for the service manager (fakes, on Linux); a build that fails stops the service with 69."""
    import supervisor.daemon.run

    def failing_build(settings: Any, name: str, kind: str, on_line: Any) -> None:
        for line in ("Collecting pyzmq", "Building wheel", "error: compiler failed"):
            on_line(line)
        raise EnvError("pip install failed (exit code 1)")

    monkeypatch.setattr(supervisor.daemon.run, "create_env", failing_build)
    # The client socket is bound before the build (it answers meanwhile): tcp, as on Windows.
    endpoints = [f'client_endpoint = "tcp://127.0.0.1:{free_port()}"', 'worker_endpoint = "tcp://127.0.0.1:*"']
    lines = [
        'log_format = "json"',
        "create_envs = true",
        *endpoints,
        f'events_endpoint = "tcp://127.0.0.1:{free_port()}"',
    ]
    write_config(programdata, lines, {"f": fake_engine(tmp_path)[0]})
    scm = start_service(windows)
    scm.wait_stopped(60)
    pending = [status for status in windows.statuses if status[1] == SERVICE_START_PENDING]
    assert (
        len(pending) >= 2 and pending[-1][6] == 600_000
    )  # waitHint: a build line may be followed by 10 minutes of compiling
    assert [status[5] for status in pending] == sorted({status[5] for status in pending})  # checkpoints only grow
    assert windows.states()[-1] == SERVICE_STOPPED and windows.statuses[-1][3:5] == (
        ERROR_SERVICE_SPECIFIC_ERROR,
        ExitCode.UNAVAILABLE,
    )
    assert scm.process_exit_code == ExitCode.UNAVAILABLE
    assert windows.errors() == [
        f"node-supervisor did not start (exit code 69: the engine environments could not be prepared): "
        f"preparation failed: pip install failed (exit code 1). The daemon's log is in {programdata / 'state' / 'logs'}"
    ]


def test_the_service_keeps_its_state_and_config_under_programdata_unless_configured(programdata, tmp_path, monkeypatch):
    settings = load_service_settings()  # no file at all: the defaults
    assert (settings.state_dir, settings.data_dir) == (programdata / "state", programdata / "data")
    assert settings.log_dir == programdata / "state" / "logs"
    write_config(programdata, [f"data_dir = {toml_value(tmp_path / 'models')}"])
    settings = load_service_settings()
    assert (settings.state_dir, settings.data_dir) == (programdata / "state", tmp_path / "models")
    monkeypatch.setenv("NODESUP_STATE_DIR", str(tmp_path / "state"))
    assert load_service_settings().state_dir == tmp_path / "state"
    other = write_config(tmp_path / "elsewhere", ['log_level = "debug"'])
    monkeypatch.setenv("NODESUP_CONFIG", str(other))
    assert load_service_settings().log_level == "debug"
    monkeypatch.setenv("NODESUP_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_service_settings()


def test_every_worker_joins_one_kill_on_close_job_and_a_failure_to_join_never_raises(windows):
    """Job object assignment with fakes (on Linux): one job for every worker; a failure never raises."""
    assert job_object.contain(101) and job_object.contain(102)
    assert len(windows.jobs) == 1 and windows.jobs[0].pids == [101, 102] and windows.jobs[0].kills_on_close
    assert windows.jobs[0].limits["BasicLimitInformation"]["LimitFlags"] == JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    windows.open_process_error = OSError("access denied")
    assert job_object.contain(103) is False
    assert windows.jobs[0].pids == [101, 102] and len(windows.jobs) == 1


def test_the_service_command_line_is_pywin32s_and_off_windows_says_what_it_needs(windows):
    from winservice.__main__ import main

    assert main(["winservice", "install"]) == 0
    ((kind, (service_class, argv)),) = windows.events
    assert (
        kind == "command line"
        and service_class.__name__ == "NodeSupervisorService"
        and argv == ["winservice", "install"]
    )
    if sys.platform != "win32":
        result = subprocess.run(
            [sys.executable, "-m", "winservice", "install"], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == ExitCode.UNAVAILABLE
        assert "needs Windows and pywin32" in result.stderr and "Traceback" not in result.stderr
