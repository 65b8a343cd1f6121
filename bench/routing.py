"""Routing capacity: how many requests the daemon carries when the engine costs nothing.

    .venv/bin/python bench/routing.py [--clients 4] [--seconds 10]     (also part of make bench)

The daemon serves one engine of the fake kind with no token delay (its worker
answers a 1-token request at once), and N client processes (each its own
Python, so the clients' interpreter lock is no limit) send 1-token requests
back to back for a fixed window.  Everything a request's round trip takes is
added by the path (client library, ZeroMQ, the daemon's routing, the worker
runtime), so its p50/p99 is the added latency at that load; requests/s is the
capacity.  The one worker takes one request at a time, so with N clients a
request also waits for the others in the queue: that wait is part of the
figure.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import percentile  # noqa: E402
from supervisor.client import Client  # noqa: E402
from tests.conftest import Daemon  # noqa: E402

NULL_ENGINE = {"kind": "fake", "options": {"token_delay_s": 0}}
WARM_UP_REQUESTS = 50


def _client(endpoint: str, seconds: float, start: Any, results: Any) -> None:
    """One client process: warm up, wait for the others, then requests back to back for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    with Client(endpoint, timeout_s=30) as client:
        for _ in range(WARM_UP_REQUESTS):
            client.complete(prompt="ping", max_tokens=1)
        start.wait()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            began = time.perf_counter()
            answer = client.complete(prompt="ping", max_tokens=1)
            latencies.append(time.perf_counter() - began)
            errors += answer["event"] != "done"
    results.put({"latencies": latencies, "errors": errors})


def measure_routing(shared: dict[str, Path], clients: int, seconds: float) -> dict[str, Any]:
    daemon = Daemon(shared, {"null": NULL_ENGINE}, supervision={"probe_interval_s": 0})
    context = multiprocessing.get_context("spawn")  # no ZeroMQ context of this process in the children
    start, results = context.Barrier(clients + 1), context.Queue()
    try:
        daemon.start()
        processes = [context.Process(target=_client, args=(daemon.endpoint, seconds, start, results)) for _ in range(clients)]
        for process in processes:
            process.start()
        start.wait(timeout=120)
        answers = [results.get(timeout=seconds + 120) for _ in processes]
        for process in processes:
            process.join(timeout=30)
    finally:
        daemon.stop()
    latencies = [ms * 1000 for answer in answers for ms in answer["latencies"]]
    return {
        "clients": clients, "seconds": seconds, "requests": len(latencies), "errors": sum(a["errors"] for a in answers),
        "requests_per_s": len(latencies) / seconds,
        "round_trip_ms": {"p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99), "max": max(latencies)},
    }  # fmt: skip


def main() -> int:
    from tests.conftest import shared_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    settings = shared_settings()
    shared = {"envs_dir": settings.envs_dir, "data_dir": settings.data_dir}
    figures = measure_routing(shared, args.clients, args.seconds)
    trip = figures["round_trip_ms"]
    print(f"{figures['requests']} requests in {args.seconds:.0f} s from {args.clients} client processes, {figures['errors']} errors: "
          f"{figures['requests_per_s']:.0f} requests/s; round trip p50 {trip['p50']:.2f} ms, p99 {trip['p99']:.2f} ms, max {trip['max']:.2f} ms")  # fmt: skip
    return 0 if figures["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
