"""What carrying tokens costs each process, in CPU time and wake-ups per token.

    .venv/bin/python bench/overhead.py [--requests 20] [--threads N | --fake TOKEN_DELAY_S] [--http]

Wall-clock throughput on a small shared machine moves by several percent from
run to run; the cost of the daemon's path does not.  This reads the kernel's
per-thread scheduler accounting (/proc/<pid>/task/<tid>/schedstat: time on a
CPU, time waiting for one, and the number of times it ran) for the daemon, the
worker and this client, around a series of 128-token requests on the real
llama.cpp worker, and prints it per generated token.  The worker's compute
threads are shown apart from the threads that only carry messages.  With
``--http`` the requests go through the daemon's HTTP front (/v1/completions,
streamed, bench/http_stream.py) instead of the Python client.  Linux only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import MAX_TOKENS, N_CTX, PROMPT, SEED  # noqa: E402
from bench.http_stream import FrontClient  # noqa: E402
from bench.llama_server import free_port  # noqa: E402
from supervisor.node.models import ensure_default_model  # noqa: E402
from tests.conftest import Daemon, shared_settings  # noqa: E402


def thread_stats(pid: int) -> dict[int, tuple[str, int, int, int]]:
    """tid -> (thread name, ns on CPU, ns waiting for a CPU, times run)."""
    stats = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            on_cpu, waiting, runs = (int(x) for x in (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        stats[int(task.name)] = (name, on_cpu, waiting, runs)
    return stats


def delta(before: dict, after: dict) -> dict[int, tuple[str, int, int, int]]:
    out = {}
    for tid, (name, cpu, wait, runs) in after.items():
        _, cpu0, wait0, runs0 = before.get(tid, (name, 0, 0, 0))
        out[tid] = (name, cpu - cpu0, wait - wait0, runs - runs0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp n_threads (default: the engine's default)")
    parser.add_argument(
        "--fake",
        type=float,
        metavar="TOKEN_DELAY_S",
        help="the fake engine at this token delay instead of llama.cpp: the carrying path alone",
    )
    parser.add_argument(
        "--http", action="store_true", help="through the daemon's HTTP front instead of the Python client over ZeroMQ"
    )
    args = parser.parse_args()

    settings = shared_settings()
    model = ensure_default_model(settings, print)
    shared = {"envs_dir": settings.envs_dir, "data_dir": settings.data_dir, "model": model}
    engine = {"kind": "llamacpp", "n_ctx": N_CTX, **({"n_threads": args.threads} if args.threads else {})}
    if args.fake is not None:
        engine = {"kind": "fake", "options": {"token_delay_s": args.fake}}
    port = free_port()
    daemon = Daemon(
        shared,
        {"llama": engine},
        supervision={"probe_interval_s": 0},
        **({"http": {"listen": f"127.0.0.1:{port}"}} if args.http else {}),
    )
    daemon.start()
    try:
        client = daemon.client(timeout_s=120)
        worker_pid = daemon.engine("llama")["workers"][0]["pid"]
        pids = {"daemon": daemon.process.pid, "worker": worker_pid, "client": os.getpid()}
        if args.http:
            front = FrontClient(port, "llama", ignore_eos=False)
            generate = lambda: front.run(PROMPT, MAX_TOKENS)["tokens"]  # noqa: E731
        else:
            request = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, "seed": SEED, "stream": True}
            generate = lambda: client.complete(**request)["usage"]["completion_tokens"]  # noqa: E731
        generate()  # warm-up
        before = {role: thread_stats(pid) for role, pid in pids.items()}
        tokens = sum(generate() for _ in range(args.requests))
        after = {role: thread_stats(pid) for role, pid in pids.items()}
    finally:
        daemon.stop()

    print(
        f"{args.requests} requests, {tokens} tokens, {engine['kind']} engine, {'HTTP front' if args.http else 'ZeroMQ'}; per generated token:"
    )
    print(f"{'process':<8} {'thread':<16} {'tid':>7} {'CPU us':>9} {'wait us':>9} {'runs':>7}")
    totals = {}
    for role in pids:
        rows = delta(before[role], after[role])
        compute_floor = max(cpu for _, cpu, _, _ in rows.values()) * 0.3
        for tid, (name, cpu, wait, runs) in sorted(rows.items(), key=lambda item: -item[1][1]):
            if runs == 0:
                continue
            group = "compute" if role == "worker" and cpu >= compute_floor else "carry"
            key = (role, group)
            c, w, r = totals.get(key, (0, 0, 0))
            totals[key] = (c + cpu, w + wait, r + runs)
            print(
                f"{role:<8} {name[:16]:<16} {tid:>7} {cpu / tokens / 1000:>9.1f} {wait / tokens / 1000:>9.1f} {runs / tokens:>7.2f}"
            )
    print("totals:")
    carry_cpu = 0
    for (role, group), (cpu, wait, runs) in totals.items():
        if group == "carry":
            carry_cpu += cpu
        print(
            f"  {role:<8} {group:<8} CPU {cpu / tokens / 1000:8.1f} us  wait {wait / tokens / 1000:8.1f} us  runs {runs / tokens:6.2f}"
        )
    print(f"  carrying tokens (all but the worker's compute threads): {carry_cpu / tokens / 1000:.1f} us CPU per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
