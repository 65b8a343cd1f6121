"""Throughput and time to first token: through the daemon vs. llama-cpp-python in-process.

    make bench        (or: .venv/bin/python bench/throughput.py [--rounds 16] [--threads N])

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
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.envs import env_python  # noqa: E402
from supervisor.models import ensure_default_model  # noqa: E402
from tests.conftest import Daemon, shared_settings  # noqa: E402

PROMPT = "The capital of France is"
MAX_TOKENS = 128
# Each process's first request after another process has computed is slower
# (about 11 ms more to the first token here: caches and TLBs hold the other
# process's model), which interleaving would charge to whichever path follows
# a switch.  So every measured request follows a short one on the same path.
WARM_UP_TOKENS = 4
SEED = 42
N_CTX = 2048


def daemon_runs(daemon: Daemon, reps: int, max_tokens: int = MAX_TOKENS) -> list[dict]:
    client = daemon.client(timeout_s=120)
    runs = []
    for _ in range(reps):
        started = time.perf_counter()
        first = None
        pieces: list[str] = []
        request_id = client.send({"op": "generate", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "seed": SEED})
        for event in client.events(request_id):
            if event["event"] == "token":
                if first is None:
                    first = time.perf_counter() - started
                pieces.append(event["text"])
            elif event["event"] == "done":
                runs.append({"text": "".join(pieces), "tokens": event["usage"]["completion_tokens"], "ttft_s": first, "total_s": time.perf_counter() - started})
            else:
                raise RuntimeError(f"daemon error: {event}")
    return runs


def summarize(runs: list[dict]) -> dict:
    return {
        "tokens_per_s": statistics.median(r["tokens"] / r["total_s"] for r in runs),
        "ttft_ms": statistics.median(r["ttft_s"] * 1000 for r in runs),
        "tokens": runs[0]["tokens"],
    }


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16, help="measured requests per path")
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp n_threads and n_threads_batch on both paths (default: the engine's default)")
    args = parser.parse_args()

    settings = shared_settings()
    model = ensure_default_model(settings, print)
    shared = {"envs_dir": settings.envs_dir, "data_dir": settings.data_dir, "model": model}
    engine = {"kind": "llamacpp", "n_ctx": N_CTX, **({"n_threads": args.threads} if args.threads else {})}
    daemon = Daemon(shared, {"llama": engine}, supervision={"probe_interval_s": 0})
    daemon.start()
    # The baseline runs with the threads the worker reports in force (its
    # defaults, unless --threads), so both paths compute alike.
    in_force = daemon.engine("llama")["workers"][0]["model"]
    threads = [str(args.threads or in_force["n_threads"]), str(args.threads or in_force["n_threads_batch"])]
    try:
        direct = subprocess.Popen(
            [str(env_python(settings.envs_dir / "llamacpp")), str(REPO / "bench" / "direct_llama.py"), str(model), str(N_CTX), *threads],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
    except BaseException:
        daemon.stop()
        raise
    assert direct.stdin and direct.stdout
    ready = json.loads(direct.stdout.readline())
    version, n_threads = ready["llama_cpp_python"], ready["n_threads"]

    def ask_direct(mode: str, reps: int, max_tokens: int = MAX_TOKENS) -> list[dict]:
        direct.stdin.write(json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "seed": SEED, "reps": reps, "mode": mode}) + "\n")
        direct.stdin.flush()
        return json.loads(direct.stdout.readline())["runs"]

    results: dict[str, list[dict]] = {"generate": [], "completion": [], "daemon": []}
    try:
        ask_direct("generate", 1), ask_direct("completion", 1), daemon_runs(daemon, 1)  # warm-up
        paths = ["generate", "daemon", "completion"]
        for round_ in range(args.rounds):
            for path in paths[round_ % 3 :] + paths[: round_ % 3]:
                run = (lambda n, tokens: daemon_runs(daemon, n, tokens)) if path == "daemon" else (lambda n, tokens: ask_direct(path, n, tokens))
                run(1, WARM_UP_TOKENS)  # not measured: see WARM_UP_TOKENS
                results[path] += run(1, MAX_TOKENS)
    finally:
        daemon.stop()
        direct.stdin.close()
        direct.wait(timeout=30)

    texts = {path: {r["text"] for r in runs} for path, runs in results.items()}
    same = all(len(t) == 1 for t in texts.values()) and len(set().union(*texts.values())) == 1
    base, comp, served = summarize(results["generate"]), summarize(results["completion"]), summarize(results["daemon"])
    print(f"machine: {machine()}; llama-cpp-python {version}")
    print(f"prompt {PROMPT!r}, {MAX_TOKENS} tokens, temperature 0, seed {SEED}, n_threads {n_threads}{'' if args.threads else ' (default)'}, {args.rounds} rounds")
    print(f"{'path':<44} {'tokens':>6} {'tokens/s':>9} {'TTFT ms':>8}")
    for label, figures in (
        ("in-process, Llama.generate loop (baseline)", base),
        ("in-process, create_completion(stream=True)", comp),
        ("through the daemon (Python client)", served),
    ):
        print(f"{label:<44} {figures['tokens']:>6} {figures['tokens_per_s']:>9.2f} {figures['ttft_ms']:>8.1f}")
    print(f"ratio daemon / baseline tokens/s: {served['tokens_per_s'] / base['tokens_per_s']:.3f}  (target >= 0.98)")
    paired = statistics.median((d["ttft_s"] - b["ttft_s"]) * 1000 for d, b in zip(results["daemon"], results["generate"]))
    print(f"median TTFT overhead (daemon - baseline, same round): {paired:+.2f} ms  (target <= 2 ms)")
    print("same text on every path: " + ("yes" if same else "MISMATCH"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
