"""Throughput and time to first token: through the daemon vs. llama-cpp-python in-process.

    make bench-throughput   (or: .venv/bin/python bench/throughput.py [--rounds 16] [--threads N])

Same prompt, greedy (temperature 0), fixed seed, 128 tokens, on the default
model, with the threads the daemon's worker reports in force (its defaults,
or --threads) on both paths.  Each round runs one measured request on every
path, each after a short unmeasured one on the same path (WARM_UP_TOKENS), in
an order that rotates from round to round: the baseline
(bench/direct_llama.py, run by the llama.cpp environment's interpreter,
Llama.generate), the same library's create_completion(stream=True), and the
daemon (the Python client).  The baseline's model and the daemon's worker are
loaded once and stay loaded.  All paths must produce the same text, or the
run says MISMATCH and fails.

Tokens/s is tokens / total request time (prefill included); the ratio is of
the medians.  TTFT is from the call (or the client's send) to the first text;
the overhead is the median, over rounds, of the daemon's TTFT minus the
baseline's in the same round, so the machine's drift between rounds (larger
than the overhead on a shared machine) cancels out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import (
    MAX_TOKENS,
    N_CTX,
    PROMPT,
    SEED,
    WARM_UP_TOKENS,
    Direct,
    daemon_runs,
    in_force,
    machine,
    paired_ttft_ms,
    rotated,
    summarize,
)  # noqa: E402
from supervisor.node.models import ensure_default_model  # noqa: E402
from tests.conftest import Daemon, shared_settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16, help="measured requests per path")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="llama.cpp n_threads and n_threads_batch on both paths (default: the engine's default)",
    )
    args = parser.parse_args()

    settings = shared_settings()
    model = ensure_default_model(settings, print)
    shared = {"envs_dir": settings.envs_dir, "data_dir": settings.data_dir, "model": model}
    engine = {"kind": "llamacpp", "n_ctx": N_CTX, **({"n_threads": args.threads} if args.threads else {})}
    daemon = Daemon(shared, {"llama": engine}, supervision={"probe_interval_s": 0})
    daemon.start()
    try:
        # The baseline runs with what the worker reports in force, so both paths compute alike.
        direct = Direct(settings.envs_dir, model, N_CTX, in_force(daemon, "llama"))
    except BaseException:
        daemon.stop()
        raise
    version, n_threads = direct.ready["llama_cpp_python"], direct.ready["n_threads"]
    client = daemon.client(timeout_s=120)

    def run(path: str, reps: int, max_tokens: int = MAX_TOKENS) -> list[dict]:
        # ignore_eos off, as most requests are; the prompt runs to MAX_TOKENS without an end.
        if path == "daemon":
            return daemon_runs(client, reps, max_tokens, ignore_eos=False)
        return direct.runs(path, reps, max_tokens, ignore_eos=False)

    results: dict[str, list[dict]] = {"generate": [], "completion": [], "daemon": []}
    try:
        run("generate", 1), run("completion", 1), run("daemon", 1)  # warm-up
        for round_ in range(args.rounds):
            for path in rotated(["generate", "daemon", "completion"], round_):
                run(path, 1, WARM_UP_TOKENS)  # not measured: see WARM_UP_TOKENS
                results[path] += run(path, 1, MAX_TOKENS)
    finally:
        daemon.stop()
        direct.close()

    texts = {path: {r["text"] for r in runs} for path, runs in results.items()}
    same = all(len(t) == 1 for t in texts.values()) and len(set().union(*texts.values())) == 1
    base, comp, served = summarize(results["generate"]), summarize(results["completion"]), summarize(results["daemon"])
    print(f"machine: {machine()}; llama-cpp-python {version}")
    print(
        f"prompt {PROMPT!r}, {MAX_TOKENS} tokens, temperature 0, seed {SEED}, n_threads {n_threads}{'' if args.threads else ' (default)'}, {args.rounds} rounds"
    )
    print(f"{'path':<44} {'tokens':>6} {'tokens/s':>9} {'TTFT ms':>8}")
    for label, figures in (
        ("in-process, Llama.generate loop (baseline)", base),
        ("in-process, create_completion(stream=True)", comp),
        ("through the daemon (Python client)", served),
    ):
        print(f"{label:<44} {figures['tokens']:>6} {figures['tokens_per_s']:>9.2f} {figures['ttft_ms']:>8.1f}")
    print(f"ratio daemon / baseline tokens/s: {served['tokens_per_s'] / base['tokens_per_s']:.3f}  (target >= 0.98)")
    paired = paired_ttft_ms(results["daemon"], results["generate"])
    print(f"median TTFT overhead (daemon - baseline, same round): {paired:+.2f} ms  (target <= 2 ms)")
    print("same text on every path: " + ("yes" if same else "MISMATCH"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
