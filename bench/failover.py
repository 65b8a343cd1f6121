"""Failover figures on the real llama.cpp worker and the default model.

    make bench-failover        (or: .venv/bin/python bench/failover.py [--runs N])

Measures, with the daemon's default supervision settings (heartbeat 1 s,
backoff from 1 s with jitter):

* SIGKILL -> detection: the kill until the daemon publishes worker.exit;
* SIGKILL -> first token again, warm standby: a second engine loaded and
  ready takes the request at once;
* SIGKILL -> first token again, cold restart: one engine, the request waits
  for the backoff, the new worker and the model load;
* SIGSTOP -> hang detected: until the daemon publishes worker.hang;
* requests lost: every request sent must end with exactly one terminal event.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from tests.conftest import LLAMA, Daemon, shared_settings  # noqa: E402
from tests.test_supervision import Events  # noqa: E402
from supervisor.node.models import ensure_default_model  # noqa: E402


def first_token_after(daemon: Daemon, start: float) -> tuple[float, dict]:
    """Send one request; return (seconds from ``start`` to its first token, its terminal event)."""
    client = daemon.client(timeout_s=120)
    first = None
    terminal: dict = {}
    for event in client.generate(prompt="Hello", max_tokens=4, temperature=0.0):
        if event["event"] == "token" and first is None:
            first = time.monotonic() - start
        if event["event"] in ("done", "error"):
            terminal = event
    return (first if first is not None else float("nan")), terminal


def worker_pid(daemon: Daemon, engine: str) -> int:
    return daemon.engine(engine)["workers"][0]["pid"]


def wait_ready(daemon: Daemon, engine: str, worker_number: int) -> None:
    daemon.wait_for(
        lambda s: any(
            e["name"] == engine and e["state"] == "ready" and e["workers"][0]["id"] == f"{engine}.{worker_number}"
            for e in s["engines"]
        ),
        120,
    )


def measure(runs: int) -> dict[str, list[float] | int]:
    settings = shared_settings()
    shared = {
        "envs_dir": settings.envs_dir,
        "data_dir": settings.data_dir,
        "model": ensure_default_model(settings, print),
    }
    figures: dict[str, list[float] | int] = {"detect": [], "warm": [], "cold": [], "hang": [], "sent": 0, "terminal": 0}

    # Warm standby: two engines on the default model; unpinned traffic on "primary".
    # A short dwell time only so that traffic returns to "primary" between runs.
    daemon = Daemon(
        shared,
        {"primary": {**LLAMA, "priority": 10}, "standby": {**LLAMA, "priority": 20}},
        supervision={"switch_min_dwell_s": 2.0},
    )
    daemon.start()
    events = Events(daemon)
    try:
        for run in range(runs):
            wait_ready(daemon, "primary", run + 1)
            daemon.wait_for(lambda s: s["daemon"]["active_engine"] == "primary", 120)
            pid = worker_pid(daemon, "primary")
            killed, wall_killed = time.monotonic(), time.time()
            os.kill(pid, signal.SIGKILL)
            ttft, terminal = first_token_after(daemon, killed)
            figures["sent"] += 1
            figures["terminal"] += bool(terminal)
            exit_event = events.wait("worker.exit", lambda e, n=run + 1: e["worker_id"] == f"primary.{n}", 30)
            figures["detect"].append(exit_event["time"] - wall_killed)
            figures["warm"].append(ttft)
            print(
                f"warm run {run + 1}: first token {ttft * 1000:.0f} ms after SIGKILL, served by {terminal.get('engine')}"
            )
    finally:
        events.close()
        daemon.stop()

    # Cold restart: one engine; the request waits for the replacement.
    # stable_after_s=5: the worker is up longer than that before each kill, so
    # every run measures a first crash (the backoff's shortest delay, 0.5-1 s).
    daemon = Daemon(shared, {"llama": LLAMA}, supervision={"stable_after_s": 5.0})
    daemon.start()
    events = Events(daemon)
    try:
        for run in range(runs):
            wait_ready(daemon, "llama", run + 1)
            time.sleep(5.5)
            killed = time.monotonic()
            os.kill(worker_pid(daemon, "llama"), signal.SIGKILL)
            ttft, terminal = first_token_after(daemon, killed)
            figures["sent"] += 1
            figures["terminal"] += bool(terminal)
            figures["cold"].append(ttft)
            print(f"cold run {run + 1}: first token {ttft * 1000:.0f} ms after SIGKILL ({terminal.get('event')})")
        # Hangs: SIGSTOP, detected by missing heartbeats.
        for run in range(runs):
            wait_ready(daemon, "llama", runs + run + 1)
            stopped = time.monotonic()
            wall_stopped = time.time()
            os.kill(worker_pid(daemon, "llama"), signal.SIGSTOP)
            hang = events.wait("worker.hang", lambda e, n=runs + run + 1: e["worker_id"] == f"llama.{n}", 60)
            figures["hang"].append(hang["time"] - wall_stopped)
            print(
                f"hang run {run + 1}: detected {figures['hang'][-1] * 1000:.0f} ms after SIGSTOP ({time.monotonic() - stopped:.2f}s wall)"
            )
    finally:
        events.close()
        daemon.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    figures = measure(args.runs)
    print()
    print(f"machine: {machine()}")
    print(f"{'measure':<42} {'median':>9} {'min':>9} {'max':>9}")
    for key, label in (
        ("detect", "SIGKILL -> exit detected"),
        ("warm", "SIGKILL -> first token, warm standby"),
        ("cold", "SIGKILL -> first token, cold restart"),
        ("hang", "SIGSTOP -> hang detected"),
    ):
        values = [v * 1000 for v in figures[key]]  # type: ignore[union-attr]
        print(f"{label:<42} {statistics.median(values):>7.0f}ms {min(values):>7.0f}ms {max(values):>7.0f}ms")
    lost = figures["sent"] - figures["terminal"]  # type: ignore[operator]
    print(f"requests sent {figures['sent']}, with a terminal event {figures['terminal']}, lost {lost}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
