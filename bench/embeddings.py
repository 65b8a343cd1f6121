"""Embeddings per second: the daemon (ZeroMQ embed op and POST /v1/embeddings) beside llama-server
``--embeddings`` and llama-cpp-python's ``Llama.embed`` in its own process, on the same model.

    .venv/bin/python bench/embeddings.py [--inputs 32] [--batch 8] [--rounds 3] [--threads N] [--model GGUF]

One run: every path loads the model once in embedding mode (mean pooling, normalized, the
threads the daemon's worker has in force, n_ctx 2048, batch and micro-batch 2048) and embeds the
same ``--inputs`` sentences, ``--batch`` inputs per request, one request at a time, in each of
``--rounds`` rounds (the paths' order rotating from round to round so drift hits every path alike).
The figure is the median over rounds of inputs embedded per second of wall time.  llama-server
gets ``--batch`` slots with a unified cache, so it can decode a request's inputs together as the
worker does; it is built by bench/llama_server_build.py (cached under the test state).  The first
vector of every path is compared with the daemon's (cosine), so a path that embeds differently
shows.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from bench.llama_server import ServerProcess, free_port  # noqa: E402
from bench.llama_server_build import ServerBuildError, ensure_llama_server  # noqa: E402
from supervisor.node.envs import env_python  # noqa: E402
from supervisor.node.models import ensure_default_model  # noqa: E402
from tests.conftest import Daemon, shared_settings  # noqa: E402

N_CTX = 2048
SUBJECTS = ["the river", "a small robot", "the old library", "my neighbour's cat", "the night train", "a glacier"]
VERBS = ["remembers", "slowly crosses", "is painted beside", "quietly hums near", "was built under"]

# llama-cpp-python in its own process: reads {"inputs": [...]} lines, answers {"vectors": [...], "s": seconds}.
DIRECT = r"""
import json, sys, time, llama_cpp
model, n_ctx, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_ctx=n_ctx,
                      n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
print(json.dumps({"ready": llama_cpp.__version__}), flush=True)
for line in sys.stdin:
    inputs = json.loads(line)["inputs"]
    started = time.perf_counter()
    vectors = llm.embed(inputs, normalize=True)
    print(json.dumps({"vectors": vectors, "s": time.perf_counter() - started}), flush=True)
"""


def sentences(count: int) -> list[str]:
    return [
        f"{SUBJECTS[i % len(SUBJECTS)]} {VERBS[i % len(VERBS)]} sentence number {i} of this benchmark."
        for i in range(count)
    ]


def post_json(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        response = connection.getresponse()
        payload = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {payload}")
        return payload
    finally:
        connection.close()


class DirectEmbed:
    def __init__(self, envs_dir: Path, model: Path, threads: int) -> None:
        command = [str(env_python(envs_dir / "llamacpp")), "-c", DIRECT, str(model), str(N_CTX), str(threads)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.process.stdout
        self.version = json.loads(self.process.stdout.readline())["ready"]

    def embed(self, inputs: list[str]) -> list[list[float]]:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps({"inputs": inputs}) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["vectors"]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def server_command(binary: Path, model: Path, port: int, threads: int, slots: int) -> list[str]:
    return [
        str(binary),
        *("--model", str(model), "--host", "127.0.0.1", "--port", str(port)),
        *("--ctx-size", str(N_CTX), "--parallel", str(slots), "--kv-unified"),
        *("--threads", str(threads), "--threads-batch", str(threads)),
        *("--batch-size", str(N_CTX), "--ubatch-size", str(N_CTX), "--n-gpu-layers", "0"),
        *("--embeddings", "--pooling", "mean", "--no-webui", "--cache-ram", "0"),
    ]


def cosine(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b)) / (
        math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    )


def measure(
    paths: dict[str, Callable[[list[str]], list[list[float]]]], inputs: list[str], batch: int, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Inputs per second of each path in each round, and each path's first vector."""
    rates: dict[str, list[float]] = {name: [] for name in paths}
    first: dict[str, list[float]] = {}
    names = list(paths)
    for name in names:  # warm-up: one request each, unmeasured
        first[name] = paths[name](inputs[:batch])[0]
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            started = time.perf_counter()
            for start in range(0, len(inputs), batch):
                vectors = paths[name](inputs[start : start + batch])
                assert len(vectors) == len(inputs[start : start + batch])
            rates[name].append(len(inputs) / (time.perf_counter() - started))
            print(f"  round {round_ + 1} {name}: {rates[name][-1]:.1f} inputs/s", flush=True)
    return rates, first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=32, help="inputs embedded per round and path")
    parser.add_argument("--batch", type=int, default=8, help="inputs per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, help="a GGUF model (default: the default model)")
    args = parser.parse_args()
    settings = shared_settings()
    try:
        binary, _build = ensure_llama_server(settings, False, lambda line: print(line, flush=True))
    except ServerBuildError as exc:
        print(f"llama-server is left out: {exc}", flush=True)
        binary = None
    model = args.model.resolve() if args.model else ensure_default_model(settings, print)
    shared = {"envs_dir": settings.envs_dir, "data_dir": settings.data_dir, "model": model}
    http_port = free_port()
    engine = {"kind": "llamacpp", "model": str(model), "n_ctx": N_CTX, "n_gpu_layers": 0, "n_threads": args.threads}
    daemon = Daemon(
        shared,
        {"emb": {**engine, "embedding": True, "pooling": "mean", "n_batch": N_CTX}},
        supervision={"probe_interval_s": 0},
        http={"listen": f"127.0.0.1:{http_port}"},
    )
    server: ServerProcess | None = None
    direct: DirectEmbed | None = None
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as logs:
        try:
            daemon.start(timeout=300.0)
            client = daemon.client(timeout_s=600.0)

            def zeromq(inputs: list[str]) -> list[list[float]]:
                event = client.embed(inputs, engine="emb")
                assert event["event"] == "embeddings", event
                return event["embeddings"]

            def front(inputs: list[str]) -> list[list[float]]:
                answer = post_json(http_port, "/v1/embeddings", {"model": "emb", "input": inputs})
                return [item["embedding"] for item in answer["data"]]

            paths: dict[str, Callable[[list[str]], list[list[float]]]] = {"daemon zeromq": zeromq, "daemon http": front}
            direct = DirectEmbed(settings.envs_dir, model, args.threads)
            paths["llama-cpp-python in-process"] = direct.embed
            if binary is not None:
                port = free_port()
                server = ServerProcess(
                    server_command(binary, model, port, args.threads, args.batch), port, Path(logs) / "server.log"
                )
                server.wait_ready()

                def llama_server(inputs: list[str]) -> list[list[float]]:
                    answer = post_json(port, "/v1/embeddings", {"input": inputs, "encoding_format": "float"})
                    return [item["embedding"] for item in sorted(answer["data"], key=lambda d: d["index"])]

                paths["llama-server --embeddings"] = llama_server
            inputs = sentences(args.inputs)
            print(f"{machine()}; {args.inputs} inputs, {args.batch} per request, {args.rounds} rounds", flush=True)
            rates, first = measure(paths, inputs, args.batch, args.rounds)
        finally:
            if server is not None:
                server.stop()
            if direct is not None:
                direct.close()
            daemon.stop()
    print(f"\n{'path':32} {'inputs/s (median)':>18} {'min':>8} {'max':>8} {'cosine vs daemon':>17}")
    for name, values in rates.items():
        similarity = cosine(first[name], first["daemon zeromq"])
        print(f"{name:32} {statistics.median(values):18.1f} {min(values):8.1f} {max(values):8.1f} {similarity:17.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
