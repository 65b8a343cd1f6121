"""The benchmark report's figures from the raw runs, its table, and its JSON file."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, machine_facts, paired_ratio, paired_ttft_ms, summarize
from bench.front import describe as describe_front
from bench.routing import describe as describe_routing

RESULTS = REPO / "bench" / "results"
# What the project aims at; the report shows each beside its figure.
# name -> (rule, threshold, where the figure is in the report)
TARGETS = {
    "single daemon/direct tokens/s": (">=", 0.99, ("single_figures", "ratios", "daemon/direct")),
    "single daemon/llama-server tokens/s": (">=", 1.0, ("single_figures", "ratios", "daemon/llama-server")),
    "single http-front/direct tokens/s": (">=", 0.99, ("single_figures", "ratios", "http-front/direct")),
    "single http-front/llama-server tokens/s": (">=", 1.0, ("single_figures", "ratios", "http-front/llama-server")),
    "TTFT overhead daemon - direct (ms)": ("<=", 1.0, ("single_figures", "paired_ttft_ms", "daemon - direct")),
    "TTFT overhead http-front - direct (ms)": ("<=", 1.0, ("single_figures", "paired_ttft_ms", "http-front - direct")),
    "concurrent daemon/llama-server aggregate": (">=", 1.0, ("concurrent_figures", "ratios", "daemon/llama-server")),
    "concurrent http-front/llama-server aggregate": (
        ">=",
        1.0,
        ("concurrent_figures", "ratios", "http-front/llama-server"),
    ),
    "HTTP front/ZeroMQ tokens/s, fake engine": (">=", 0.98, ("front", "ratio")),
    "TTFT HTTP front - ZeroMQ, fake engine (ms)": ("<=", 2.0, ("front", "paired_ttft_ms")),
    "single http-front/daemon tokens/s": (">=", 0.98, ("single_figures", "ratios", "http-front/daemon")),
    "TTFT http-front - daemon (ms)": ("<=", 2.0, ("single_figures", "paired_ttft_ms", "http-front - daemon")),
    "routing requests/s": (">=", 10000.0, ("routing", "requests_per_s")),
    "routing p99 round trip (ms)": ("<=", 5.0, ("routing", "round_trip_ms", "p99")),
}
LCP_SERVER = "llama-cpp-python-server"
# (path, baseline): each path against the baseline, and the daemon's paths against llama-server and
# llama-cpp-python's server (when that path ran).
SINGLE_PAIRS = (
    ("daemon", "direct"),
    ("http-front", "direct"),
    ("llama-server", "direct"),
    (LCP_SERVER, "direct"),
    ("daemon", "llama-server"),
    ("http-front", "llama-server"),
    ("daemon", LCP_SERVER),
    ("http-front", LCP_SERVER),
    ("http-front", "daemon"),
)


def single_figures(single: dict[str, list[dict]]) -> dict[str, Any]:
    base = single["direct"]
    paths = {
        name: {
            **summarize(runs),
            "tokens_per_s_range": [
                min(r["tokens"] / r["total_s"] for r in runs),
                max(r["tokens"] / r["total_s"] for r in runs),
            ],
            "token_counts": sorted({r["tokens"] for r in runs}),
            "same_text_as_direct": all(r["text"] == b["text"] for r, b in zip(runs, base)),
        }
        for name, runs in single.items()
    }
    rate = {name: figures["tokens_per_s"] for name, figures in paths.items()}
    pairs = [(a, b) for a, b in SINGLE_PAIRS if a in single and b in single]
    return {
        "paths": paths,
        "ratios": {f"{a}/{b}": rate[a] / rate[b] for a, b in pairs},
        "paired_ratios": {f"{a}/{b}": paired_ratio(single[a], single[b]) for a, b in pairs},
        "paired_ttft_ms": {f"{a} - {b}": paired_ttft_ms(single[a], single[b]) for a, b in pairs},
    }


def _aggregate(round_: dict) -> float:
    """A concurrent round's tokens/s: every client's tokens over the round's wall time."""
    return sum(r["tokens"] for r in round_["runs"]) / round_["wall_s"]


def concurrent_figures(together: dict[str, list[dict]]) -> dict[str, Any]:
    paths = {}
    for name, rounds in together.items():
        aggregate = [_aggregate(round_) for round_ in rounds]
        runs = [r for round_ in rounds for r in round_["runs"]]
        paths[name] = {
            "aggregate_tokens_per_s": statistics.median(aggregate),
            "per_request_tokens_per_s": statistics.median(r["tokens"] / r["total_s"] for r in runs),
            "ttft_ms_median": statistics.median(r["ttft_s"] * 1000 for r in runs),
            "ttft_ms_max": max(r["ttft_s"] * 1000 for r in runs),
            "round_wall_s_median": statistics.median(round_["wall_s"] for round_ in rounds),
            "token_counts": sorted({r["tokens"] for r in runs}),
        }
    server = paths["llama-server"]["aggregate_tokens_per_s"]
    others = [name for name in paths if name != "llama-server"]
    return {
        "paths": paths,
        "ratios": {f"{name}/llama-server": paths[name]["aggregate_tokens_per_s"] / server for name in others},
        # Each round's ratio to llama-server's round next to it: what the machine's drift between rounds does not move.
        "paired_ratios": {
            f"{name}/llama-server": statistics.median(
                _aggregate(a) / _aggregate(b) for a, b in zip(together[name], together["llama-server"])
            )
            for name in others
        },
    }


def _git_commit() -> str:
    found = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def write_report(report: dict[str, Any], out: Path | None) -> Path:
    report["machine"] = {**machine_facts(), "in_force": report["in_force"]}
    report["versions"] = {
        "node_supervisor": _git_commit(),
        "llama_cpp_python": report["ready"]["llama_cpp_python"],
        "llama_server": report["llama_server"]["version"],
        "python": report["machine"]["python"],
    }
    report["targets"] = {}
    for name, (op, threshold, where) in TARGETS.items():
        value: Any = report
        for key in where:
            value = value[key]
        report["targets"][name] = {
            "rule": f"{op} {threshold:g}",
            "value": value,
            "met": value >= threshold if op == ">=" else value <= threshold,
        }
    out = out or RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return out


def _print_single(single: dict[str, Any], rounds: int) -> None:
    print(f"\nsingle stream, {rounds} rounds in rotation (medians)")
    print(f"{'path':<23} {'tokens':>7} {'tokens/s':>9} {'min-max tokens/s':>17} {'TTFT ms':>8}  same text as direct")
    for name, figures in single["paths"].items():
        counts = "/".join(str(c) for c in figures["token_counts"])
        low, high = figures["tokens_per_s_range"]
        print(
            f"{name:<23} {counts:>7} {figures['tokens_per_s']:>9.2f} {f'{low:.1f}-{high:.1f}':>17} {figures['ttft_ms']:>8.2f}  {'yes' if figures['same_text_as_direct'] else 'no'}"
        )
    print("ratios of the medians (tokens/s): " + ", ".join(f"{k} {v:.3f}" for k, v in single["ratios"].items()))
    print(
        "paired ratios (median over rounds): " + ", ".join(f"{k} {v:.3f}" for k, v in single["paired_ratios"].items())
    )
    print(
        "paired TTFT difference (median over rounds): "
        + ", ".join(f"{k} {v:+.2f} ms" for k, v in single["paired_ttft_ms"].items())
    )


def print_report(report: dict[str, Any]) -> None:
    machine, args, settings = report["machine"], report["args"], report["in_force"]
    build, lcp = report["llama_server"]["build"], report.get("llama_cpp_python_server")
    print()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['system']}, Python {machine['python']}")
    print(
        f"llama-cpp-python {report['versions']['llama_cpp_python']}; llama-server {report['versions']['llama_server']} "
        f"({'CUDA' if build['cuda'] else 'CPU'} build, {' '.join(build['cmake_flags'])}; CFLAGS {build['CFLAGS']!r})"
    )
    print(
        f"{LCP_SERVER}: "
        + (
            f"python -m llama_cpp.server {lcp['version']} (the same build), "
            + ", ".join(f"{k} {v}" for k, v in lcp["packages"].items())
            if lcp
            else "left out (why: above)"
        )
    )
    print(
        f"node-supervisor {report['versions']['node_supervisor']}; model {Path(report['model']).name}; {args['tokens']} tokens, temperature 0, "
        f"ignore_eos ({LCP_SERVER}: none there, every stream checked to finish for its length); in force on every path: "
        + ", ".join(f"{k} {v}" for k, v in settings.items())
    )
    _print_single(report["single_figures"], args["rounds"])
    together = report["concurrent_figures"]
    print(
        f"\n{args['clients']} concurrent clients, {args['concurrent_rounds']} rounds (the daemon's engine parallel = {args['clients']}; llama-server --parallel {args['clients']}; not {LCP_SERVER}: one request at a time)"
    )
    print(f"{'path':<14} {'aggregate tok/s':>16} {'per request tok/s':>18} {'TTFT ms median':>15} {'TTFT ms max':>12}")
    for name, figures in together["paths"].items():
        print(
            f"{name:<14} {figures['aggregate_tokens_per_s']:>16.2f} {figures['per_request_tokens_per_s']:>18.2f} {figures['ttft_ms_median']:>15.1f} {figures['ttft_ms_max']:>12.1f}"
        )
    print("ratio (aggregate tokens/s): " + ", ".join(f"{k} {v:.3f}" for k, v in together["ratios"].items()))
    print(
        "paired ratio (median over rounds): " + ", ".join(f"{k} {v:.3f}" for k, v in together["paired_ratios"].items())
    )
    front = report["front"]
    print(
        f"\nHTTP front vs ZeroMQ, fake engine at {front['token_delay_s'] * 1000:g} ms per token, {front['tokens']} tokens, {front['rounds']} rounds"
    )
    print("\n".join(describe_front(front)))
    routing = report["routing"]
    print(
        f"\nrouting capacity (null engine with {routing['parallel']} sequences, 1-token requests, {routing['clients']} client processes, {routing['seconds']:.0f} s each)"
    )
    print("\n".join(describe_routing(routing)))
    print("\ntargets")
    for name, target in report["targets"].items():
        print(
            f"  {name:<44} {target['value']:>10.3f}  target {target['rule']:<9} {'met' if target['met'] else 'MISSED'}"
        )
