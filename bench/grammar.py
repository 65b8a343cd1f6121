"""What a grammar costs per token: the same request with and without constrained output, through the daemon.

    NODESUP_TEST_STATE=... .venv/bin/python bench/grammar.py [--rounds 8] [--tokens 64]

The default model behind the daemon (one llama.cpp worker), greedy with a
fixed seed, the same prompt on three paths in an order that rotates from round
to round: no constraint (the baseline), ``response_format`` json_object, and
``response_format`` json_schema (a nested object with an enum and an array).
Each measured request follows a short unmeasured one on the same path.

Per-token cost is the time from the first token to the end over the tokens
after the first (the decode alone: the grammar sampler runs on every token);
the time to the first token shows what building the grammar adds (the schema
is converted to GBNF and parsed in the worker for each request).  Ratios are
medians of per-round ratios against the baseline of the same round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import N_CTX, SEED, WARM_UP_TOKENS, machine, rotated  # noqa: E402
from supervisor.client import Client  # noqa: E402
from supervisor.node.models import ensure_default_model  # noqa: E402
from tests.conftest import Daemon, shared_settings  # noqa: E402

PROMPT = "A JSON object describing the city of Paris:\n"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "country": {"type": "string", "enum": ["France", "Germany", "Italy"]},
        "districts": {"type": "array", "items": {"type": "string"}},
        "facts": {"type": "object", "properties": {"population": {"type": "integer"}}, "required": ["population"]},
    },
    "required": ["name", "country", "districts", "facts"],
}
PATHS = {
    "plain": {},
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}},
}


def timed(client: Client, extra: dict, max_tokens: int) -> dict:
    """One streamed request: time to the first token, and per token after it."""
    started = time.perf_counter()
    first = last = None
    request = {"op": "generate", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "seed": SEED}
    request_id = client.send({**request, **extra})
    for event in client.events(request_id):
        if event["event"] == "token":
            last = time.perf_counter()
            first = first or last
        elif event["event"] == "done":
            tokens = event["usage"]["completion_tokens"]
            if first is None or tokens < 2:
                raise RuntimeError(f"too few tokens to time: {event}")
            return {"ttft_s": first - started, "per_token_s": (last - first) / (tokens - 1), "tokens": tokens}
    raise RuntimeError(f"daemon error: {event}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    settings = shared_settings()
    model = ensure_default_model(settings, print)
    shared = {"envs_dir": settings.envs_dir, "data_dir": settings.data_dir, "model": model}
    daemon = Daemon(shared, {"llama": {"kind": "llamacpp", "n_ctx": N_CTX}}, supervision={"probe_interval_s": 0})
    daemon.start()
    results: dict[str, list[dict]] = {name: [] for name in PATHS}
    try:
        client = daemon.client(timeout_s=120)
        for extra in PATHS.values():
            timed(client, extra, args.tokens)  # not measured: pages the model in, warms each path
        for round_ in range(args.rounds):
            for name in rotated(list(PATHS), round_):
                timed(client, {**PATHS[name]}, WARM_UP_TOKENS)
                results[name].append(timed(client, PATHS[name], args.tokens))
    finally:
        daemon.stop()

    print(f"machine: {machine()}; prompt {PROMPT!r}, up to {args.tokens} tokens, greedy, {args.rounds} rounds")
    print(f"{'path':<12} {'tokens':>6} {'ms/token':>9} {'ratio':>6} {'TTFT ms':>8} {'TTFT +ms':>9}")
    base = results["plain"]
    for name, runs in results.items():
        ratio = statistics.median(r["per_token_s"] / b["per_token_s"] for r, b in zip(runs, base))
        extra_ttft = statistics.median((r["ttft_s"] - b["ttft_s"]) * 1000 for r, b in zip(runs, base))
        print(
            f"{name:<12} {statistics.median(r['tokens'] for r in runs):>6.0f}"
            f" {statistics.median(r['per_token_s'] for r in runs) * 1000:>9.2f} {ratio:>6.3f}"
            f" {statistics.median(r['ttft_s'] for r in runs) * 1000:>8.1f} {extra_ttft:>+9.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
