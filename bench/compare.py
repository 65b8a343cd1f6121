"""The benchmark report: the daemon beside llama-cpp-python in-process and llama.cpp's own llama-server.

    make bench     (or: .venv/bin/python bench/compare.py [--rounds 16] [--tokens 128] [--threads N] [--gpu] [--out FILE]
                    [--model GGUF])

One run, on the default model (or ``--model``), greedy, fixed seed, ``--tokens`` tokens per
request (``ignore_eos``: every path generates exactly that many):

* single stream: llama-cpp-python called in its own process
  (bench/direct_llama.py, the baseline), the daemon through the Python client
  over ZeroMQ, the daemon's HTTP front (/v1/completions), llama-server
  (built by bench/llama_server_build.py from the llama.cpp the installed
  llama-cpp-python vendors, with the same flags) over HTTP, and
  llama-cpp-python's own server (``python -m llama_cpp.server``, in an
  environment bench/llama_cpp_python_server.py makes with the installed
  build; /v1/completions; left out, with a line saying why, when that
  environment cannot be made).  Each round runs
  one measured request on every path, each after a short unmeasured one on
  the same path, in an order that rotates from round to round, so drift hits
  every path alike; the figures are medians, and the TTFT overhead is the
  median of each round's difference from the baseline.
* N concurrent clients (``--clients``, 4), one request each per round: the
  daemon's engine with ``parallel = N`` over ZeroMQ and over HTTP, and
  llama-server with N slots; aggregate tokens/s over the round's wall time.
  Not llama-cpp-python's server: it serves one request at a time, and a
  request arriving while one streams ends that one (``interrupt_requests``).
* routing capacity (bench/routing.py): the daemon with an engine that answers
  at once (the fake engine, no delay, 64 sequences), 1-token requests from N
  client processes, one at a time and pipelined (2 in flight per client):
  requests/s and the round trip's p50/p99.
* the HTTP front against the ZeroMQ path with the engine's spread taken out
  (bench/front.py): a fake engine at 2 ms per token, paired rounds.

Every path computes with what the daemon's worker reports in force (its
defaults, or ``--threads``): threads, batch sizes, flash attention, GPU
layers (``--gpu``: all, on a CUDA build), and the same context per sequence.
Prints a table and writes every figure to a JSON file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import (
    MAX_TOKENS,
    N_CTX,
    PROMPT,
    WARM_UP_PROMPT,
    WARM_UP_TOKENS,
    Direct,
    RunFn,
    daemon_run,
    in_force,
    rotated,
    single_stream,
)  # noqa: E402
from bench.http_stream import FrontClient  # noqa: E402
from bench.llama_cpp_python_server import LlamaCppPythonServer, ServerEnvError, ensure_server_env  # noqa: E402
from bench.llama_server import LlamaServer, ServerProcess, free_port  # noqa: E402
from bench.llama_server_build import ServerBuildError, ensure_llama_server  # noqa: E402
from bench.report import concurrent_figures, print_report, single_figures, write_report  # noqa: E402
from bench.front import measure_front  # noqa: E402
from bench.routing import measure_routing  # noqa: E402
from supervisor.planning.measure.gpu import probe  # noqa: E402
from supervisor.node.models import ensure_default_model  # noqa: E402
from tests.conftest import Daemon, shared_settings  # noqa: E402

FRONT_ROUNDS = 30
FRONT_TOKEN_DELAY_S = 0.002  # a small model on a GPU: where what the path costs per token shows most
# Concurrent clients ask different prompts (differing from the first word), so
# the daemon's one worker cannot reuse the previous request's prompt.
CLIENT_PROMPTS = [
    PROMPT,
    "In the beginning",
    "My favourite food is",
    "Water boils at",
    "A good book",
    "Yesterday we went",
    "Small dogs are",
    "Every morning I",
]


def concurrent_round(clients: list[RunFn], tokens: int) -> dict:
    """Every client sends one request at the same moment; the round ends with the last one."""
    runs: list[dict | BaseException] = [RuntimeError("did not run")] * len(clients)
    barrier = threading.Barrier(len(clients) + 1)

    def client_thread(index: int) -> None:
        barrier.wait()
        try:
            runs[index] = clients[index](CLIENT_PROMPTS[index % len(CLIENT_PROMPTS)], tokens)
        except BaseException as exc:  # reported by the caller, with the others' results
            runs[index] = exc

    threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    failed = [run for run in runs if isinstance(run, BaseException)]
    if failed:
        raise RuntimeError(f"a concurrent client failed: {failed[0]!r}")
    return {"wall_s": wall, "runs": runs}


def concurrent(paths: dict[str, list[RunFn]], rounds: int, tokens: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in paths}
    for round_ in range(rounds):
        for name in rotated(list(paths), round_):
            paths[name][0](WARM_UP_PROMPT, WARM_UP_TOKENS)
            results[name].append(concurrent_round(paths[name], tokens))
        print(
            f"  concurrent round {round_ + 1}/{rounds}: "
            + ", ".join(
                f"{n} {sum(r['tokens'] for r in results[n][-1]['runs']) / results[n][-1]['wall_s']:.1f} tok/s"
                for n in paths
            ),
            flush=True,
        )
    return results


def check_gpu() -> None:
    snapshot = probe()
    if not snapshot.devices:
        raise ServerBuildError(
            f"--gpu needs an NVIDIA GPU, and this machine has none that NVML can see ({snapshot.reason})"
        )


def server_version(binary: Path) -> str:
    found = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    return " ".join((found.stdout + found.stderr).split())[-200:]


def server_env(settings: Any) -> dict[str, Any] | None:
    """llama-cpp-python's server environment (made once), or None, said in one line, when it cannot be made."""
    try:
        return ensure_server_env(settings, lambda line: print(line, flush=True))
    except ServerEnvError as exc:
        print(f"llama-cpp-python's server is left out: {' '.join(str(exc).split())[:500]}", flush=True)
        return None


def engines(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """One engine per load shape: "llama" for single streams, "llama4" with a sequence per client."""
    base = {
        "kind": "llamacpp",
        "n_ctx": N_CTX,
        "n_gpu_layers": -1 if args.gpu else 0,
        **({"n_threads": args.threads} if args.threads else {}),
    }
    return {"llama": {**base, "priority": 10}, "llama4": {**base, "parallel": args.clients, "priority": 20}}


class Paths:
    """Every path, loaded once and kept loaded: the daemon (ZeroMQ and its HTTP front), llama-cpp-python
    in-process with what the daemon's worker has in force, llama-server (1 slot, N slots) likewise, and
    llama-cpp-python's server (``lcp_env``: its environment's record; None leaves it out) likewise."""

    def __init__(
        self,
        args: argparse.Namespace,
        shared: dict[str, Path],
        binary: Path,
        lcp_env: dict[str, Any] | None,
        logs: Path,
    ) -> None:
        self.http_port = free_port()
        self.daemon = Daemon(
            shared, engines(args), supervision={"probe_interval_s": 0}, http={"listen": f"127.0.0.1:{self.http_port}"}
        )
        self.direct: Direct | None = None
        self.servers: list[LlamaServer] = []
        self.lcp_server: LlamaCppPythonServer | None = None
        try:
            self.daemon.start()
            self.settings = in_force(self.daemon, "llama")
            if in_force(self.daemon, "llama4") != self.settings:
                raise RuntimeError(
                    f"the engines compute differently: {self.settings} vs {in_force(self.daemon, 'llama4')}"
                )
            self.direct = Direct(shared["envs_dir"], shared["model"], N_CTX, self.settings)
            self.servers = [
                LlamaServer(binary, shared["model"], N_CTX, self.settings, slots, logs / f"llama-server-np{slots}.log")
                for slots in (1, args.clients)
            ]
            if lcp_env is not None:
                self.lcp_server = LlamaCppPythonServer(
                    lcp_env, shared["model"], N_CTX, self.settings, logs / "llama-cpp-python-server.log"
                )
            for server in self._server_processes():
                server.wait_ready()
        except BaseException:
            self.close()
            raise
        self.clients = [self.daemon.client(timeout_s=600) for _ in range(args.clients)]

    def single(self) -> dict[str, RunFn]:
        assert self.direct is not None
        return {
            "direct": self.direct.run,
            "daemon": lambda prompt, n: daemon_run(self.clients[0], prompt, n, engine="llama"),
            "http-front": FrontClient(self.http_port, "llama").run,
            "llama-server": self.servers[0].client().run,
            **({"llama-cpp-python-server": self.lcp_server.client().run} if self.lcp_server else {}),
        }

    def together(self) -> dict[str, list[RunFn]]:
        return {
            "daemon": [lambda prompt, n, c=c: daemon_run(c, prompt, n, engine="llama4") for c in self.clients],
            "http-front": [FrontClient(self.http_port, "llama4").run for _ in self.clients],
            "llama-server": [self.servers[1].client().run for _ in self.clients],
        }

    def _server_processes(self) -> list[ServerProcess]:
        return [*self.servers, *([self.lcp_server] if self.lcp_server else [])]

    def close(self) -> None:
        self.daemon.stop()
        for server in self._server_processes():
            server.stop()
        if self.direct is not None:
            self.direct.close()


def run_llm(
    args: argparse.Namespace, shared: dict[str, Path], binary: Path, lcp_env: dict[str, Any] | None, logs: Path
) -> dict[str, Any]:
    """Single stream and concurrent rounds, every path side by side."""
    paths = Paths(args, shared, binary, lcp_env, logs)
    try:
        print(f"single stream: {args.rounds} rounds of {args.tokens} tokens", flush=True)
        single = single_stream(paths.single(), args.rounds, args.tokens)
        print(f"{args.clients} concurrent clients: {args.concurrent_rounds} rounds", flush=True)
        together = concurrent(paths.together(), args.concurrent_rounds, args.tokens)
    finally:
        paths.close()
    assert paths.direct is not None
    return {
        "ready": paths.direct.ready,
        "in_force": paths.settings,
        "single": single,
        "concurrent": together,
        "server_commands": {f"np{s.slots}": s.command for s in paths.servers},
        "llama_cpp_python_server": None
        if paths.lcp_server is None or lcp_env is None
        else {
            **{key: value for key, value in lcp_env.items() if key != "settings"},
            "command": paths.lcp_server.command,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=16, help="single-stream rounds (one measured request per path each)"
    )
    parser.add_argument("--concurrent-rounds", type=int, default=8, help="rounds of one request per client")
    parser.add_argument("--tokens", type=int, default=MAX_TOKENS, help="tokens per measured request")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="llama.cpp n_threads and n_threads_batch on every path (default: the engine's)",
    )
    parser.add_argument(
        "--clients", type=int, default=4, help="concurrent clients (and llama-server slots; routing clients)"
    )
    parser.add_argument("--routing-seconds", type=float, default=10.0, help="length of the routing-capacity window")
    parser.add_argument("--gpu", action="store_true", help="a CUDA build, every layer on the GPU (n_gpu_layers -1)")
    parser.add_argument("--out", type=Path, help="JSON file for every figure (default: bench/results/<time>.json)")
    parser.add_argument("--model", type=Path, help="a GGUF model (default: the default model, made once)")
    args = parser.parse_args()

    settings = shared_settings()
    try:
        if args.gpu:
            check_gpu()
        binary, build = ensure_llama_server(settings, args.gpu, lambda line: print(line, flush=True))
    except ServerBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lcp_env = server_env(settings)
    shared = {
        "envs_dir": settings.envs_dir,
        "data_dir": settings.data_dir,
        "model": args.model.resolve() if args.model else ensure_default_model(settings, print),
    }
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with tempfile.TemporaryDirectory(prefix="bench-") as logs:
        llm = run_llm(args, shared, binary, lcp_env, Path(logs))
    print(f"routing capacity: {args.clients} client processes, {args.routing_seconds:.0f} s", flush=True)
    routing = measure_routing(shared, args.clients, args.routing_seconds)
    print(f"HTTP front vs ZeroMQ with a fake engine: {FRONT_ROUNDS} rounds", flush=True)
    front = measure_front(shared, FRONT_ROUNDS, args.tokens, FRONT_TOKEN_DELAY_S)
    report = {
        "started": started,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": str(shared["model"]),
        "llama_server": {"binary": str(binary), "version": server_version(binary), "build": build},
        **llm,
        "single_figures": single_figures(llm["single"]),
        "concurrent_figures": concurrent_figures(llm["concurrent"]),
        "front": front,
        "routing": routing,
    }
    out = write_report(report, args.out)
    print_report(report)
    print(f"every figure: {out}")
    counts = {r["tokens"] for runs in llm["single"].values() for r in runs}
    return 0 if counts == {args.tokens} else 1


if __name__ == "__main__":
    sys.exit(main())
