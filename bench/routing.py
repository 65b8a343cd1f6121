"""Routing capacity: how many requests the daemon carries when the engine costs nothing.

    .venv/bin/python bench/routing.py [--clients 4] [--in-flight 2] [--parallel 64] [--seconds 10]
    (also part of make bench)

The daemon serves one engine of the fake kind with no token delay and
``parallel`` sequences (its worker answers a 1-token request at once, with as
many requests at a time as it has slots), and N client processes (each its own
Python, so the clients' interpreter lock is no limit) send 1-token requests
through the Python client for a fixed window.  Everything a request's round
trip takes is added by the path (client library, ZeroMQ, the daemon's routing,
the worker runtime), so its p50/p99 is the added latency at that load.

Two loads, one after the other on the same daemon:

* ``one at a time``: each client waits for a request's answer before sending
  the next, so requests/s is N divided by one round trip: a latency figure,
  bounded by the hops between processes rather than by any one's work;
* ``pipelined`` (the capacity): each client keeps ``in_flight`` requests
  outstanding on its one connection, sending the next as one ends, as a busy
  service with several callers on its socket does; requests/s is what the
  daemon carries, and a round trip includes the wait behind the requests
  ahead of it.
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
from workers import protocol as p  # noqa: E402
from tests.conftest import Daemon  # noqa: E402

WARM_UP_REQUESTS = 50
REQUEST = {"op": p.OP_GENERATE, "prompt": "ping", "max_tokens": 1, "stream": False}


def null_engine(parallel: int) -> dict[str, Any]:
    return {"kind": "fake", "options": {"token_delay_s": 0}, **({"parallel": parallel} if parallel > 1 else {})}


def _client(endpoint: str, seconds: float, in_flight: int, start: Any, results: Any) -> None:
    """One client process: warm up, wait for the others, then keep ``in_flight`` requests outstanding for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    with Client(endpoint, timeout_s=30) as client:
        for _ in range(WARM_UP_REQUESTS):
            client.complete(prompt="ping", max_tokens=1)
        start.wait()
        sent: dict[str, float] = {}
        end = time.monotonic() + seconds
        for _ in range(in_flight):
            sent[client.send(REQUEST)] = time.perf_counter()
        while sent:
            event = client.receive_any()
            if event.get("event") not in p.TERMINAL_EVENTS:
                continue  # a token of a request (none with stream false) or a status
            began = sent.pop(event["id"])
            latencies.append(time.perf_counter() - began)
            errors += event["event"] != p.EVENT_DONE
            if time.monotonic() < end:
                sent[client.send(REQUEST)] = time.perf_counter()
    results.put({"latencies": latencies, "errors": errors})


def _load(endpoint: str, clients: int, seconds: float, in_flight: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")  # no ZeroMQ context of this process in the children
    start, results = context.Barrier(clients + 1), context.Queue()
    processes = [
        context.Process(target=_client, args=(endpoint, seconds, in_flight, start, results)) for _ in range(clients)
    ]
    for process in processes:
        process.start()
    start.wait(timeout=120)
    began = time.perf_counter()
    answers = [results.get(timeout=seconds + 120) for _ in processes]
    elapsed = time.perf_counter() - began  # the window plus the last answers in flight
    for process in processes:
        process.join(timeout=30)
    latencies = [ms * 1000 for answer in answers for ms in answer["latencies"]]
    return {
        "in_flight": in_flight,
        "requests": len(latencies),
        "errors": sum(a["errors"] for a in answers),
        "requests_per_s": len(latencies) / elapsed,
        "round_trip_ms": {
            "p50": percentile(latencies, 0.50),
            "p99": percentile(latencies, 0.99),
            "max": max(latencies),
        },
    }


def measure_routing(
    shared: dict[str, Path], clients: int, seconds: float, in_flight: int = 2, parallel: int = 64
) -> dict[str, Any]:
    """Both loads on one daemon; the pipelined one's figures are the capacity (top-level keys)."""
    daemon = Daemon(shared, {"null": null_engine(parallel)}, supervision={"probe_interval_s": 0})
    try:
        daemon.start()
        one_at_a_time = _load(daemon.endpoint, clients, seconds, 1)
        pipelined = _load(daemon.endpoint, clients, seconds, in_flight)
    finally:
        daemon.stop()
    return {"clients": clients, "seconds": seconds, "parallel": parallel, **pipelined, "one_at_a_time": one_at_a_time}


def describe(figures: dict[str, Any]) -> list[str]:
    lines = []
    for name, load in (
        ("one at a time", figures["one_at_a_time"]),
        (f"pipelined, {figures['in_flight']} in flight per client", figures),
    ):
        trip = load["round_trip_ms"]
        lines.append(
            f"  {name}: {load['requests']} requests, {load['errors']} errors: {load['requests_per_s']:.0f} requests/s; "
            f"round trip p50 {trip['p50']:.2f} ms, p99 {trip['p99']:.2f} ms, max {trip['max']:.2f} ms"
        )
    return lines


def main() -> int:
    from tests.conftest import shared_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--in-flight", type=int, default=2, help="requests each client keeps outstanding in the pipelined load"
    )
    parser.add_argument("--parallel", type=int, default=64, help="the null engine's sequences at once")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    settings = shared_settings()
    shared = {"envs_dir": settings.envs_dir, "data_dir": settings.data_dir}
    figures = measure_routing(shared, args.clients, args.seconds, args.in_flight, args.parallel)
    print(
        f"routing capacity: null engine with {args.parallel} sequences, {args.clients} client processes, {args.seconds:.0f} s each load"
    )
    print("\n".join(describe(figures)))
    return 0 if figures["errors"] == 0 and figures["one_at_a_time"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
