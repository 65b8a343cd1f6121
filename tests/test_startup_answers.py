"""Answers during start-up: the client socket is bound first, so while the daemon prepares (here: the
default model's install, held by a package index that does not answer yet) ping and status say what it
is doing, and a generate gets `not_ready` at once; with no daemon socket at all a command fails at once."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from supervisor.client import Client

from .conftest import CLI, TEST_STATE, toml_value
from .test_startup import clean_environ


class HeldIndex:
    """A package index that holds every request until released, then has nothing (404)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.asked = threading.Event()
        held = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                held.asked.set()
                held.release.wait(120)
                self.send_error(404)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


def test_ping_status_and_generate_answer_while_the_default_model_is_being_installed(tmp_path):
    index = HeldIndex()
    state = Path(tmp_path / "s")
    config = tmp_path / "config.toml"
    config.write_text(
        "\n".join(
            [
                f"state_dir = {toml_value(state)}",
                f"data_dir = {toml_value(tmp_path / 'data')}",  # no default model here yet
                f"envs_dir = {toml_value(TEST_STATE / 'envs')}",
                'log_format = "json"',
                "create_envs = false",
                f"pip_args = {toml_value(['--isolated', '--index-url', index.url, '--retries', '0'])}",
                "[engines.llama]",
                'kind = "llamacpp"',
            ]
        )
        + "\n"
    )
    daemon = subprocess.Popen([*CLI, "--config", str(config), "run"], env=clean_environ(), stderr=subprocess.PIPE)
    endpoint = f"ipc://{state}/run/client.sock"
    try:
        assert index.asked.wait(120), "pip never asked the index"
        with Client(endpoint, timeout_s=2.0) as client:
            pong = client.ping()
            assert pong["event"] == "pong" and pong["phase"] == "assembling the default model", pong
            status = client.status()
            assert status["daemon"]["serving"] is False and status["engines"] == []
            assert status["daemon"]["phase"] == "assembling the default model"
            refused = client.complete(prompt="Hello", max_tokens=3)
            assert refused["event"] == "error" and refused["code"] == "not_ready", refused
            assert "assembling the default model" in refused["message"]
        cli = subprocess.run(
            [*CLI, "--config", str(config), "status"], capture_output=True, text=True, timeout=30, env=clean_environ()
        )
        assert cli.returncode == 3 and "assembling the default model" in cli.stdout, cli
        index.release.set()  # the index has nothing: the install fails, and the daemon says so
        assert daemon.wait(timeout=120) == 69
    finally:
        index.close()
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)


def test_a_stop_during_start_up_ends_the_daemon_at_once(tmp_path):
    index = HeldIndex()
    state = Path(tmp_path / "s")
    config = tmp_path / "config.toml"
    config.write_text(
        f"state_dir = {toml_value(state)}\ndata_dir = {toml_value(tmp_path / 'data')}\n"
        f"envs_dir = {toml_value(TEST_STATE / 'envs')}\ncreate_envs = false\n"
        f"pip_args = {toml_value(['--isolated', '--index-url', index.url, '--retries', '0'])}\n"
        '[engines.llama]\nkind = "llamacpp"\n'
    )
    daemon = subprocess.Popen([*CLI, "--config", str(config), "run"], env=clean_environ(), stderr=subprocess.PIPE)
    try:
        assert index.asked.wait(120)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0  # the index still holds: the stop did not wait for the step
    finally:
        index.close()


def test_a_command_fails_at_once_when_no_daemon_socket_exists(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [*CLI, "--state-dir", str(tmp_path), "status"], capture_output=True, text=True, timeout=30, env=clean_environ()
    )
    assert result.returncode == 69 and "Traceback" not in result.stderr
    assert f"no daemon socket at {tmp_path}/run/client.sock" in result.stderr, result.stderr
    assert time.monotonic() - started < 5.0  # not the connect timeout: nothing was waited for


def test_generate_waits_for_a_daemon_whose_socket_exists_but_does_not_answer(tmp_path):
    """A socket file that nobody serves (a daemon killed) is still waited for, as before."""
    run = tmp_path / "run"
    run.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(run / "client.sock"))
    result = subprocess.run(
        [*CLI, "--state-dir", str(tmp_path), "ping", "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_environ(),
    )
    assert result.returncode == 69 and "within 0.5s" in result.stderr, result.stderr


def test_once_serving_the_phase_is_loading_until_an_engine_can_generate(make_daemon):
    daemon = make_daemon({"f": {"kind": "fake", "priority": 10, "options": {"load_time_s": 3.0}}}, start=False)
    daemon.start(wait_ready=False)
    loading = daemon.wait_for(lambda s: s["daemon"]["phase"] == "loading", 30)
    assert loading["daemon"]["serving"] is False and loading["engines"][0]["state"] in ("spawning", "loading")
    with daemon.client(timeout_s=5.0) as client:
        assert client.ping()["phase"] == "loading"
    serving = daemon.wait_for(lambda s: s["daemon"]["phase"] == "serving", 30)
    assert serving["daemon"]["serving"] is True and serving["engines"][0]["state"] == "ready"
