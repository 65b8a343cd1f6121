"""Shared test machinery: real engine environments, the real default model, real daemons.

Environments and the model live in one state directory kept between runs
(``NODESUP_TEST_STATE``, default ``<repo>/.state``), so llama.cpp is compiled
once; every daemon a test starts gets its own fresh directory for sockets and
logs.  Every process a test starts is killed at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from supervisor.client import Client, ClientTimeout, CurveKeys
from supervisor.config import load_settings
from supervisor.node.envs import create_env, env_is_current
from supervisor.node.keys import KeysError, local_curve
from supervisor.node.models import ensure_default_model

REPO = Path(__file__).resolve().parent.parent
TEST_STATE = Path(os.environ.get("NODESUP_TEST_STATE") or REPO / ".state")
CLI = [sys.executable, "-m", "supervisor.cli"]


def shared_settings():
    return load_settings(None, {"state_dir": TEST_STATE, "data_dir": TEST_STATE / "data"})


@pytest.fixture(scope="session")
def shared_state() -> dict[str, Path]:
    """The engine environments and the default model, created if missing."""
    settings = shared_settings()
    for kind in ("llamacpp", "exllamav2", "fake", "openai"):
        if not env_is_current(settings, kind, kind):
            create_env(settings, kind, kind, lambda line: print(line, flush=True))
    model = ensure_default_model(settings, lambda line: print(line, flush=True))
    return {"envs_dir": settings.envs_dir, "data_dir": settings.data_dir, "model": model}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Daemon:
    """A real `node-supervisor run` process with its own state directory."""

    def __init__(self, shared: dict[str, Path], engines: dict[str, dict[str, Any]], **settings: Any) -> None:
        # Short paths: ipc socket paths are limited to about 100 characters.
        self.state_dir = Path(tempfile.mkdtemp(prefix="ns-"))
        self.config_path = self.state_dir / "config.toml"
        self.shared = shared
        self.write_config(engines, **settings)
        self.endpoint = settings.get("client_endpoint") or f"ipc://{self.state_dir}/run/client.sock"
        self._curve: CurveKeys | None = None
        self.output_path = self.state_dir / "daemon.out"
        self.process: subprocess.Popen[bytes] | None = None
        self._clients: list[Client] = []
        self.worker_pids: set[int] = set()
        self.nofile: int | None = None  # RLIMIT_NOFILE for the daemon (and so its workers), when a test lowers it

    def write_config(self, engines: dict[str, dict[str, Any]], **settings: Any) -> None:
        """The daemon's config file (again, for a reload)."""
        lines = [
            f"state_dir = {toml_value(self.state_dir)}",
            f"data_dir = {toml_value(self.shared['data_dir'])}",
            f"envs_dir = {toml_value(self.shared['envs_dir'])}",
            'log_format = "json"',
            "create_envs = false",
        ]
        # The shared data directory holds the default model: a test daemon discovers models only where it says.
        settings = {"models_dir": [], **settings}
        lines += [f"{key} = {toml_value(value)}" for key, value in settings.items()]
        for name, engine in engines.items():
            lines.append(f"[engines.{name}]")
            lines += [f"{key} = {toml_value(value)}" for key, value in engine.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> "Daemon":
        output = open(self.output_path, "wb")
        # A test daemon never talks to the service manager the tests may run under; only to a test's own listener.
        environ = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        if os.environ.get("NOTIFY_SOCKET", "").startswith("@ns-test-"):
            environ.update({k: os.environ[k] for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC") if k in os.environ})
        self.process = subprocess.Popen(
            [*CLI, "--config", str(self.config_path), "run"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environ,
            preexec_fn=None if self.nofile is None else self._lower_nofile,
        )
        if wait_ready:
            self.wait_for(
                lambda s: all(
                    e["state"] == "ready" or e["state"] in ("model_not_found", "engine_unavailable", "failed")
                    for e in s["engines"]
                ),
                timeout,
            )
        return self

    def _lower_nofile(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def curve(self) -> CurveKeys | None:
        """On a tcp client endpoint, this node's own client keys (KeysError until the daemon has made them)."""
        if self._curve is None and self.endpoint.startswith("tcp://"):
            self._curve = local_curve(load_settings(self.config_path), self.endpoint)
        return self._curve

    def client(self, timeout_s: float = 60.0) -> Client:
        client = Client(self.endpoint, timeout_s=timeout_s, curve=self.curve())
        self._clients.append(client)
        return client

    def status(self) -> dict[str, Any]:
        with Client(self.endpoint, timeout_s=5.0, curve=self.curve()) as client:
            status = client.status()
        assert status["event"] == "status", status
        for engine in status["engines"]:
            self.worker_pids.update(w["pid"] for w in engine["workers"] if w["pid"])
        return status

    def engine(self, name: str) -> dict[str, Any]:
        return next(e for e in self.status()["engines"] if e["name"] == name)

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Poll status until predicate(status) holds; fail with the log tail if it never does."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"daemon exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                last = self.status()
                # Start-up answers (environments, the model: no engines yet) are not what predicates look at.
                if last["engines"] and predicate(last):
                    return last
            except (ClientTimeout, KeysError):  # not serving yet (or, on tcp, its keys not made yet)
                pass
            time.sleep(0.05)
        pytest.fail(f"condition not reached in {timeout}s; last status: {last}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.output_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def log_text(self) -> str:
        return self.output_path.read_text(errors="replace")

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        kill_all(self.worker_pids)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


@pytest.fixture
def make_daemon(shared_state: dict[str, Path]) -> Iterator[Any]:
    """Start daemons inside one test; each is stopped and its workers killed afterwards."""
    started: list[Daemon] = []

    def make(engines: dict[str, dict[str, Any]], start: bool = True, **settings: Any) -> Daemon:
        daemon = Daemon(shared_state, engines, **settings)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        daemon.stop()


# chat_format: the default model is a base model without a chat template of its own (chat is refused
# without one: tests/test_pull.py); the tests of chat mechanics name llama.cpp's built-in gemma template.
LLAMA = {"kind": "llamacpp", "n_ctx": 2048, "n_threads": 2, "priority": 10, "chat_format": "gemma"}


def fake_engine(tmp_path: Path, name: str = "f", priority: int = 10, **options: Any) -> tuple[dict[str, Any], Path]:
    """A fake engine's config, and the control file that changes its behaviour while it runs."""
    control = tmp_path / f"{name}.json"
    return {
        "kind": "fake",
        "priority": priority,
        "options": {"token_delay_s": 0.01, "control_file": str(control), **options},
    }, control


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    """Poll until predicate() is truthy (and return it); fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"not reached in {timeout}s: {what}")


def checkout_worker_environ(secret: str | None = None) -> dict[str, str]:
    """The environment of a worker started by a test: this checkout's workers/ only, and a spawn secret if given."""
    from workers.protocol import WORKER_SECRET_ENV

    environ = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", WORKER_SECRET_ENV)
    }
    environ.update(PYTHONPATH=str(REPO), PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1")
    if secret is not None:
        environ[WORKER_SECRET_ENV] = secret
    return environ


def collect(events: Iterator[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(token events, the terminal event)."""
    everything = list(events)
    assert everything and everything[-1]["event"] in ("done", "error"), everything[-1:]
    assert all(e["event"] == "token" for e in everything[:-1])
    return everything[:-1], everything[-1]


def assert_nothing_after(client: Client, request_id: str) -> None:
    """No event for the request follows its terminal one.

    The daemon answers one connection in order, so once the pong is here,
    anything it sent for the request before the pong is buffered too.
    """
    client.ping()
    assert client.buffered(request_id) == 0


@pytest.fixture(scope="module")
def llama_daemon(shared_state: dict[str, Path]) -> Iterator[Daemon]:
    """One daemon per test module: the real llama.cpp engine, plus an engine whose model is missing."""
    daemon = Daemon(
        shared_state,
        {"llama": LLAMA, "broken": {"kind": "llamacpp", "model": "/nonexistent/missing.gguf", "priority": 20}},
        max_message_bytes=65536,
    )
    try:
        yield daemon.start()
    finally:
        daemon.stop()
