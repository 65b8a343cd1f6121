"""llama.cpp's ``llama-server`` as a benchmark path: the process and its arguments.

The server computes with what the daemon's worker has in force, so that only
the serving differs: the same model, context per slot, threads
(``-t``/``-tb``), batch sizes, flash attention and GPU layers, and a
full-size sliding-window cache as llama.cpp's library default (llama-server's
own default is the smaller one).  It keeps no prompt cache in RAM
(``--cache-ram 0``) and requests ask ``cache_prompt: false``
(bench/http_stream.py).
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.http_stream import LlamaServerClient


class ServerError(Exception):
    """A server (llama-server, llama-cpp-python's) did not start."""


def server_command(binary: Path, model: Path, port: int, n_ctx: int, settings: dict[str, Any], slots: int) -> list[str]:
    """llama-server's arguments: ``n_ctx`` per slot (the server divides ``-c`` among its slots, each
    its own cells as the worker's parallel sequences), the rest as ``settings`` (common.in_force)."""
    layers = int(settings["n_gpu_layers"])
    return [
        str(binary),
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ctx-size",
        str(n_ctx * slots),
        "--parallel",
        str(slots),
        "--no-kv-unified",
        "--threads",
        str(settings["n_threads"]),
        "--threads-batch",
        str(settings["n_threads_batch"]),
        "--batch-size",
        str(settings["n_batch"]),
        "--ubatch-size",
        str(settings["n_ubatch"]),
        "--n-gpu-layers",
        "all" if layers < 0 else str(layers),
        "--flash-attn",
        "on" if settings["flash_attn"] else "off",
        "--swa-full",
        "--fit",
        "off",
        "--cache-ram",
        "0",
        "--no-webui",
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """One server process on the loopback port ``port`` its ``command`` names, its output going to ``log``;
    ready once GET ``ready_path`` answers 200."""

    name = "server"
    ready_path = "/health"

    def __init__(self, command: list[str], port: int, log: Path, environ: dict[str, str] | None = None) -> None:
        self.command, self.port, self.log = command, port, log
        self._output = open(log, "wb")
        self.process = subprocess.Popen(
            command, stdout=self._output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until GET ``ready_path`` answers 200 (llama-server: 503 while the model loads; others: no connection yet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                connection.request("GET", self.ready_path)
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                connection.close()
            time.sleep(0.1)
        raise ServerError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._output.close()


class LlamaServer(ServerProcess):
    """llama-server with ``slots`` slots on a free loopback port."""

    name = "llama-server"

    def __init__(self, binary: Path, model: Path, n_ctx: int, settings: dict[str, Any], slots: int, log: Path) -> None:
        port = free_port()
        self.slots = slots
        super().__init__(server_command(binary, model, port, n_ctx, settings, slots), port, log)

    def client(self) -> LlamaServerClient:
        return LlamaServerClient(self.port)
