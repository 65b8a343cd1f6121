"""No worker outlives its supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
import zmq

from supervisor.node.envs import env_python, worker_environ
from workers import protocol as p
from workers.protocol import messages as m

from .conftest import LLAMA, shared_settings

HEARTBEAT = 0.5


@pytest.mark.real_engine
def test_sigkill_of_the_daemon_takes_the_worker_down_within_three_heartbeats(make_daemon):
    daemon = make_daemon({"llama": LLAMA}, heartbeat_interval_s=HEARTBEAT)
    worker = psutil.Process(daemon.status()["engines"][0]["workers"][0]["pid"])
    assert worker.is_running()
    os.kill(daemon.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    daemon.process.wait()
    while is_alive(worker):
        if time.monotonic() - killed_at > 3 * HEARTBEAT:
            pytest.fail(
                f"worker {worker.pid} still alive {time.monotonic() - killed_at:.2f}s after the daemon's SIGKILL"
            )
        time.sleep(0.02)


def is_alive(process: psutil.Process) -> bool:
    """A zombie is dead: it holds no memory, only a slot until init reaps it."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_worker_exits_by_itself_when_the_daemon_goes_silent(shared_state):
    """The heartbeat watchdog alone (the daemon here stays alive, so no parent-death signal)."""
    settings = shared_settings()
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    worker = subprocess.Popen(
        [
            str(env_python(settings.envs_dir / "fake")),
            "-m",
            "workers",
            "--engine",
            "fake",
            "--endpoint",
            f"tcp://127.0.0.1:{port}",
            "--worker-id",
            "w1",
            "--heartbeat-interval",
            str(HEARTBEAT),
        ],
        env=worker_environ(settings),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Answer like a daemon for a while: hello -> load -> ready, heartbeats both ways.
        seen: list[str] = []
        deadline = time.monotonic() + 4 * HEARTBEAT + 5
        while time.monotonic() < deadline and ("ready" not in seen or len(seen) < 8):
            if router.poll(100):
                identity, frame = router.recv_multipart()
                message = p.decode(frame)
                seen.append(message["type"])
                if message["type"] == m.Hello.TYPE:
                    router.send_multipart(
                        [
                            identity,
                            p.encode({"type": m.Load.TYPE, "protocol": p.PROTOCOL_VERSION, "spec": {"model": "fake"}}),
                        ]
                    )
                router.send_multipart([identity, p.encode({"type": m.DaemonHeartbeat.TYPE})])
        assert "ready" in seen and worker.poll() is None, seen
        silent_since = time.monotonic()
        code = worker.wait(timeout=3 * HEARTBEAT + 2)
        waited = time.monotonic() - silent_since
        assert code == p.ExitCode.ORPHANED
        assert waited <= 3 * HEARTBEAT + 1.0, waited
        assert "no word from the daemon" in worker.stderr.read()
    finally:
        if worker.poll() is None:
            worker.kill()
        router.close()
        context.term()
