"""systemd's notify protocol against a real AF_UNIX datagram listener, the watchdog fed
only by a responsive event loop, and the unit file as systemd itself reads it."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from supervisor.cli.service_command import render_unit
from supervisor.daemon.notices import ServiceNotices
from supervisor.io.sd_notify import Notifier

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def listener():
    """A datagram socket in the abstract namespace, as systemd's NOTIFY_SOCKET may be; yields (address, socket)."""
    name = f"ns-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(0.05)
    yield "@" + name, sock
    sock.close()


def received(sock: socket.socket, until: float) -> list[tuple[float, str]]:
    """Every datagram until the monotonic deadline, with its arrival time."""
    out = []
    while time.monotonic() < until:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except TimeoutError:
            pass
    return out


def test_notify_sends_one_datagram_per_message_to_an_abstract_or_path_socket(listener, tmp_path):
    address, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.ready("engines: llama ready") and notifier.stopping("bye")
    assert [m for _, m in received(sock, time.monotonic() + 0.3)] == [
        "READY=1\nSTATUS=engines: llama ready",
        "STOPPING=1\nSTATUS=bye",
    ]
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_path:
        by_path.bind(str(path))
        assert Notifier({"NOTIFY_SOCKET": str(path)}).watchdog()
        assert by_path.recv(100) == b"WATCHDOG=1"
    assert not Notifier({}).ready("x") and Notifier({}).watchdog_s is None  # not under systemd: nothing sent


def test_the_watchdog_is_fed_only_while_the_event_loop_runs(listener):
    address, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    notices = ServiceNotices(notifier, _NoEngines(), SimpleNamespace(requests={}), ready_when_bound=True)

    async def run() -> None:
        async def ticker() -> None:
            while True:
                notices.tick(time.monotonic())
                await asyncio.sleep(0.02)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.5)
        time.sleep(1.0)  # the loop is blocked: nothing can feed the watchdog
        await asyncio.sleep(0.5)
        task.cancel()

    started = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: arrivals.extend(received(sock, started + 2.3)))
    reader.start()  # read while the loop runs, so each ping's arrival time is its own
    asyncio.run(run())
    reader.join()
    pings = [t - started for t, m in arrivals if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(pings) >= 8, pings
    assert max(gaps) >= 0.95  # the blocked second
    assert sorted(gaps)[-2] <= 0.2, gaps  # otherwise every half watchdog period (0.1 s)


class _NoEngines:
    def __iter__(self):
        return iter(())

    def by_priority(self):
        return []


def test_a_daemon_under_systemd_is_ready_once_its_engine_serves_feeds_the_watchdog_and_says_stopping(
    make_daemon, listener, monkeypatch
):
    address, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    daemon = make_daemon({"f": {"kind": "fake", "priority": 10, "options": {"load_time_s": 0.5}}}, start=False)
    daemon.start(wait_ready=False)
    messages = received(sock, time.monotonic() + 4.0)
    texts = [m for _, m in messages]
    ready = next(i for i, m in enumerate(texts) if m.startswith("READY=1"))
    assert "STATUS=engines: f ready" in texts[ready], texts[ready]
    assert daemon.engine("f")["state"] == "ready"
    assert sum(m == "WATCHDOG=1" for m in texts[ready:]) >= 5
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=30) == 0
    tail = [m for _, m in received(sock, time.monotonic() + 0.3)]
    assert any(m.startswith("STOPPING=1") for m in tail), tail


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (systemd's own unit checker)"
)
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    unit = tmp_path / "node-supervisor.service"
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "install-service", "--dry-run", "--user", "root"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    unit.write_text(result.stdout)
    assert (
        "Type=notify" in result.stdout
        and "WatchdogSec=" in result.stdout
        and "RestartPreventExitStatus=78" in result.stdout
    )
    assert str(Path(sys.executable).parent / "node-supervisor") in result.stdout  # this checkout's daemon
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr


def test_the_shipped_unit_is_what_install_service_writes_for_the_default_paths():
    shipped = (REPO / "systemd" / "node-supervisor.service").read_text()
    assert shipped == render_unit("/opt/node-supervisor/.venv/bin/node-supervisor", "node-supervisor")


def test_a_reload_is_announced_to_systemd_with_reloading_then_ready(make_daemon, listener, monkeypatch):
    address, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    engine = {"kind": "fake", "priority": 10}
    daemon = make_daemon({"f": engine})
    received(sock, time.monotonic() + 0.2)  # what start-up sent
    daemon.write_config({"f": {**engine, "priority": 5}})
    daemon.process.send_signal(signal.SIGHUP)
    texts = [m for _, m in received(sock, time.monotonic() + 1.5)]
    reloading = next(i for i, m in enumerate(texts) if m.startswith("RELOADING=1"))
    assert re.search(r"^MONOTONIC_USEC=\d+$", texts[reloading], re.M), texts[reloading]
    assert any(m.startswith("READY=1") for m in texts[reloading + 1 :]), texts
    assert daemon.engine("f")["priority"] == 5
