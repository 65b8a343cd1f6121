"""What the HTTP front adds to the ZeroMQ path, with the engine's own spread taken out.

    .venv/bin/python bench/front.py [--rounds 30] [--tokens 128] [--token-delay 0.002]   (also part of make bench)

One daemon serves a fake engine that produces a token every ``token_delay``
seconds (2 ms: a small model on a GPU), the same for every request, so
whatever differs between two requests is the path.  Rounds alternate (in
rotating order) one streamed request through the Python client over ZeroMQ
and one through the HTTP front (``/v1/completions``, streamed, a new
connection per request as in ``make bench``), each after a short one on the
same path.  Reported: tokens/s of each (tokens / total request time), the
ratio of the medians and the paired ratio, and the paired TTFT difference;
the goal for the front is within 2 ms TTFT and at least 0.98x the ZeroMQ
path's tokens/s.  With the real model the same comparison is in bench/compare.py,
where prefill and decode spread by several ms between rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import daemon_run, paired_ratio, paired_ttft_ms, single_stream  # noqa: E402
from bench.http_stream import FrontClient  # noqa: E402
from bench.llama_server import free_port  # noqa: E402
from tests.conftest import Daemon  # noqa: E402

PATHS = ("zeromq", "http-front")


def measure_front(shared: dict[str, Path], rounds: int, tokens: int, token_delay_s: float) -> dict[str, Any]:
    port = free_port()
    engine = {"kind": "fake", "options": {"token_delay_s": token_delay_s}}
    daemon = Daemon(shared, {"fake": engine}, supervision={"probe_interval_s": 0}, http={"listen": f"127.0.0.1:{port}"})
    try:
        daemon.start()
        client = daemon.client(timeout_s=60)
        run = {
            "zeromq": lambda prompt, n: daemon_run(client, prompt, n, engine="fake"),
            "http-front": FrontClient(port, "fake").run,
        }
        runs = single_stream(run, rounds, tokens)
    finally:
        daemon.stop()
    rate = {name: statistics.median(r["tokens"] / r["total_s"] for r in runs[name]) for name in PATHS}
    return {
        "rounds": rounds,
        "tokens": tokens,
        "token_delay_s": token_delay_s,
        "tokens_per_s": rate,
        "ttft_ms": {name: statistics.median(r["ttft_s"] for r in runs[name]) * 1000 for name in PATHS},
        "ratio": rate["http-front"] / rate["zeromq"],
        "paired_ratio": paired_ratio(runs["http-front"], runs["zeromq"]),
        "paired_ttft_ms": paired_ttft_ms(runs["http-front"], runs["zeromq"]),
        "same_tokens": {r["tokens"] for name in PATHS for r in runs[name]} == {tokens},
    }


def describe(figures: dict[str, Any]) -> list[str]:
    rate, ttft = figures["tokens_per_s"], figures["ttft_ms"]
    return [
        f"  ZeroMQ {rate['zeromq']:.1f} tokens/s, TTFT {ttft['zeromq']:.2f} ms; HTTP front {rate['http-front']:.1f} tokens/s, TTFT {ttft['http-front']:.2f} ms",
        f"  HTTP front / ZeroMQ: {figures['ratio']:.3f} (paired {figures['paired_ratio']:.3f}), TTFT {figures['paired_ttft_ms']:+.2f} ms (paired median); "
        f"every request {figures['tokens']} tokens: {'yes' if figures['same_tokens'] else 'NO'}",
    ]


def main() -> int:
    from tests.conftest import shared_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--token-delay", type=float, default=0.002, help="seconds per token of the fake engine")
    args = parser.parse_args()
    settings = shared_settings()
    figures = measure_front(
        {"envs_dir": settings.envs_dir, "data_dir": settings.data_dir}, args.rounds, args.tokens, args.token_delay
    )
    print(
        f"HTTP front vs ZeroMQ: fake engine at {args.token_delay * 1000:g} ms per token, {args.tokens} tokens, {args.rounds} rounds"
    )
    print("\n".join(describe(figures)))
    return 0 if figures["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
