"""Many models on one node against llama-server's router mode, side by side in one run.

One directory holds the default model under two names (``first.gguf`` and
``second.gguf``, symlinks); the daemon serves it as ``models_dir`` (each file
an engine loaded on demand), llama-server as ``--models-dir`` in router mode
(``--models-max 2``: both may stay loaded, as on the daemon's CPU node, where
nothing is evicted).  Each round, with both models unloaded first:

* cold: a request for ``first``: its time to first token includes the load;
* switch: a request for ``second`` while ``first`` stays loaded: the load of the other model;
* back: a request for ``first`` again, loaded: the switch once both are resident;
* steady: a longer request on ``first``: tokens per second once loaded.

The sides alternate which goes first each round.  llama-server is not built
here: ``--binary`` names one built by bench/llama_server_build.py.

    NODESUP_TEST_STATE=/work/main/.state .venv/bin/python bench/multimodel.py --binary PATH [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PROMPT, SEED, machine  # noqa: E402
from bench.http_stream import OpenAICompletions, length_finish_tokens  # noqa: E402
from bench.llama_server import ServerProcess, free_port  # noqa: E402
from supervisor.node.models import ensure_default_model  # noqa: E402
from tests.conftest import Daemon, shared_settings  # noqa: E402

NAMES = ("first", "second")
N_CTX = 2048


class Ours:
    name = "daemon"

    def __init__(self, shared: dict[str, Path], models: Path, threads: int) -> None:
        engine = {"n_ctx": N_CTX, "n_threads": threads, "keep_alive": -1}
        self.daemon = Daemon(
            shared, dict.fromkeys(NAMES, engine), models_dir=[str(models)], supervision={"probe_interval_s": 0}
        )
        self.daemon.start(wait_ready=False)
        self.daemon.wait_for(lambda status: True)
        self.client = self.daemon.client(timeout_s=600)

    def run(self, model: str, tokens: int) -> dict[str, Any]:
        started = time.perf_counter()
        first = None
        request = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0, "seed": SEED, "ignore_eos": True}
        for event in self.client.generate(engine=model, **request):
            if event["event"] == "token" and first is None:
                first = time.perf_counter() - started
            elif event["event"] == "error":
                raise RuntimeError(event)
            elif event["event"] == "done":
                return {"ttft_s": first, "total_s": time.perf_counter() - started, "tokens": tokens}
        raise RuntimeError("no terminal event")

    def unload_all(self) -> None:
        self.client.unload()
        _until(lambda: all(m["state"] == "stopped" for m in self.client.ps()["models"]), "daemon unloaded")

    def close(self) -> None:
        self.client.close()
        self.daemon.stop()


class Router:
    name = "llama-server router"

    def __init__(self, binary: Path, models: Path, threads: int, log: Path) -> None:
        self.port = free_port()
        command = [str(binary), "--models-dir", str(models), "--models-max", "2", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--ctx-size", str(N_CTX), "--threads", str(threads)]
        command += ["--threads-batch", str(threads), "--cache-ram", "0", "--no-webui"]
        self.server = ServerProcess(command, self.port, log)
        self.server.wait_ready()
        self.clients = {
            name: OpenAICompletions(self.port, name, {"cache_prompt": False, "ignore_eos": True}, length_finish_tokens)
            for name in NAMES
        }

    def run(self, model: str, tokens: int) -> dict[str, Any]:
        return self.clients[model].run(PROMPT, tokens)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
            return json.loads(connection.getresponse().read() or b"null")
        finally:
            connection.close()

    def loaded(self) -> list[str]:
        listed = self._request("GET", "/models")["data"]
        return [m["id"] for m in listed if (m.get("status") or {}).get("value") not in ("unloaded", None)]

    def unload_all(self) -> None:
        for name in self.loaded():
            self._request("POST", "/models/unload", {"model": name})
        _until(lambda: not self.loaded(), "router unloaded")

    def close(self) -> None:
        self.server.stop()


def _until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise RuntimeError(f"not reached in {timeout:.0f}s: {what}")


def round_of(side: Any, tokens: int) -> dict[str, float]:
    side.unload_all()
    time.sleep(0.5)  # the workers' memory is back
    cold = side.run("first", 4)
    switch = side.run("second", 4)
    back = side.run("first", 4)
    steady = side.run("first", tokens)
    return {
        "cold_ttft_s": cold["ttft_s"],
        "switch_ttft_s": switch["ttft_s"],
        "back_ttft_s": back["ttft_s"],
        "steady_tok_s": steady["tokens"] / steady["total_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, required=True, help="llama-server (bench/llama_server_build.py)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="tokens of the steady-state request")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    settings = shared_settings()
    model = ensure_default_model(settings, print)
    shared = {"envs_dir": settings.envs_dir, "data_dir": settings.data_dir, "model": model}
    work = Path(tempfile.mkdtemp(prefix="ns-multimodel-"))
    models = work / "models"
    models.mkdir()
    for name in NAMES:
        (models / f"{name}.gguf").symlink_to(model)
    sides: list[Any] = []
    try:
        sides = [Ours(shared, models, args.threads), Router(args.binary, models, args.threads, work / "router.log")]
        results: dict[str, list[dict[str, float]]] = {side.name: [] for side in sides}
        for index in range(args.rounds):
            for side in sides if index % 2 == 0 else reversed(sides):
                results[side.name].append(round_of(side, args.tokens))
                print(f"round {index + 1} {side.name}: {results[side.name][-1]}", flush=True)
    finally:
        for side in sides:
            side.close()
    summary = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()
    }
    version = subprocess.run([str(args.binary), "--version"], capture_output=True, text=True).stderr.strip()
    report = {"machine": machine(), "llama_server": version, "rounds": results, "median": summary}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
