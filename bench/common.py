"""What the benchmarks share: the request they time, the machine they ran on, the runners.

Every runner's ``run(prompt, max_tokens)`` returns one measured request:
``{"text", "tokens", "ttft_s", "total_s"}``, timed from the call (or the
client's send) to the first text and to the end.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.client import Client  # noqa: E402
from supervisor.node.envs import env_python  # noqa: E402

PROMPT = "The capital of France is"
MAX_TOKENS = 128
# Each process's first request after another process has computed is slower
# (about 11 ms more to the first token here: caches and TLBs hold the other
# process's model), which interleaving would charge to whichever path follows
# a switch.  So every measured request follows a short one on the same path.
WARM_UP_TOKENS = 4
# The warm-up's prompt starts differently from PROMPT, so that no engine finds
# the measured prompt already evaluated (llama-cpp-python reuses a matching
# prefix of the last prompt; llama-server is asked not to cache prompts).
WARM_UP_PROMPT = "Once upon a time"
SEED = 42
# A path: run(prompt, max_tokens) -> one measured request (the module's docstring).
RunFn = Callable[[str, int], dict]
N_CTX = 2048


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    found = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return found or platform.processor() or "unknown CPU"


def machine_facts() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def machine() -> str:
    facts = machine_facts()
    return f"{facts['cpu']}, {facts['cores']} cores, {facts['system']}, Python {facts['python']}"


def summarize(runs: list[dict]) -> dict:
    return {
        "tokens_per_s": statistics.median(r["tokens"] / r["total_s"] for r in runs),
        "ttft_ms": statistics.median(r["ttft_s"] * 1000 for r in runs),
        "tokens": runs[0]["tokens"],
    }


def paired_ttft_ms(runs: list[dict], baseline: list[dict]) -> float:
    """Median over rounds of one path's TTFT minus the baseline's in the same round: drift between rounds cancels."""
    return statistics.median((r["ttft_s"] - b["ttft_s"]) * 1000 for r, b in zip(runs, baseline))


def paired_ratio(runs: list[dict], baseline: list[dict]) -> float:
    """Median over rounds of one path's tokens/s over the baseline's in the same round."""
    return statistics.median(
        (r["tokens"] / r["total_s"]) / (b["tokens"] / b["total_s"]) for r, b in zip(runs, baseline)
    )


def percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def rotated(paths: list[str], round_: int) -> list[str]:
    """The order of the paths in one round: each takes every place in turn, so drift hits all alike."""
    shift = round_ % len(paths)
    return paths[shift:] + paths[:shift]


def single_stream(paths: dict[str, RunFn], rounds: int, tokens: int) -> dict[str, list[dict]]:
    """``rounds`` measured requests on every path, each after a short one on the same path, in rotating order."""
    results: dict[str, list[dict]] = {name: [] for name in paths}
    for run in paths.values():
        run(PROMPT, tokens)  # not measured: the first request of a path pages the model in
    for round_ in range(rounds):
        for name in rotated(list(paths), round_):
            paths[name](WARM_UP_PROMPT, WARM_UP_TOKENS)  # not measured: see WARM_UP_TOKENS
            results[name].append(paths[name](PROMPT, tokens))
        print(
            f"  single stream round {round_ + 1}/{rounds}: "
            + ", ".join(f"{n} {results[n][-1]['tokens'] / results[n][-1]['total_s']:.1f} tok/s" for n in paths),
            flush=True,
        )
    return results


def request_fields(prompt: str, max_tokens: int, ignore_eos: bool = True) -> dict[str, Any]:
    """The generate request every path is asked (the daemon's protocol fields).

    ``ignore_eos``: every path generates exactly ``max_tokens``, whatever the text
    (the baseline by not stopping at an end-of-generation token: bench/direct_llama.py).
    """
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": SEED, "ignore_eos": ignore_eos}


def daemon_run(
    client: Client, prompt: str, max_tokens: int, ignore_eos: bool = True, engine: str | None = None
) -> dict:
    """One streamed request through the daemon (to ``engine``, or the one it chooses), timed from the client's send."""
    started = time.perf_counter()
    first = None
    pieces: list[str] = []
    pinned = {"engine": engine} if engine else {}
    request_id = client.send({"op": "generate", **request_fields(prompt, max_tokens, ignore_eos), **pinned})
    for event in client.events(request_id):
        if event["event"] == "token":
            if first is None:
                first = time.perf_counter() - started
            pieces.append(event["text"])
        elif event["event"] == "done":
            return {
                "text": "".join(pieces),
                "tokens": event["usage"]["completion_tokens"],
                "ttft_s": first,
                "total_s": time.perf_counter() - started,
            }
    raise RuntimeError(f"daemon error: {event}")


def daemon_runs(
    client: Client, reps: int, max_tokens: int = MAX_TOKENS, prompt: str = PROMPT, ignore_eos: bool = True
) -> list[dict]:
    return [daemon_run(client, prompt, max_tokens, ignore_eos) for _ in range(reps)]


# What a llama.cpp load computes with, as the worker reports it in force (its model facts).
LOAD_SETTINGS = ("n_threads", "n_threads_batch", "n_batch", "n_ubatch", "flash_attn", "n_gpu_layers")


def in_force(daemon: Any, engine: str) -> dict[str, Any]:
    """The threads, batch sizes, flash attention and GPU layers engine ``engine``'s worker runs with."""
    facts = daemon.engine(engine)["workers"][0]["model"]
    return {key: facts[key] for key in LOAD_SETTINGS}


class Direct:
    """llama-cpp-python in its own process (bench/direct_llama.py, the llama.cpp environment's interpreter).

    The model is loaded once with ``settings`` (``in_force``: what the worker
    computes with) and stays loaded; ``ready`` is what it reports (the
    library's version, the threads and batch sizes in force).
    """

    def __init__(self, envs_dir: Path, model: Path, n_ctx: int, settings: dict[str, Any]) -> None:
        values = [int(settings[key]) for key in LOAD_SETTINGS]  # flash_attn: 0 or 1
        command = [
            str(env_python(envs_dir / "llamacpp")),
            str(REPO / "bench" / "direct_llama.py"),
            str(model),
            str(n_ctx),
            *map(str, values),
        ]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdin and self.process.stdout
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("bench/direct_llama.py exited before it was ready (its error is above)")
        self.ready: dict[str, Any] = json.loads(line)

    def runs(
        self, mode: str, reps: int, max_tokens: int = MAX_TOKENS, prompt: str = PROMPT, ignore_eos: bool = True
    ) -> list[dict]:
        assert self.process.stdin and self.process.stdout
        command = {**request_fields(prompt, max_tokens, ignore_eos), "reps": reps, "mode": mode}
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["runs"]

    def run(self, prompt: str, max_tokens: int) -> dict:
        return self.runs("generate", 1, max_tokens, prompt)[0]

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
