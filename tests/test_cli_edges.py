"""The command line as people expect it: --version, `generate -`, quiet on a closed pipe, `logs -f`
from the end with -n, global flags after the command, "–" for no data, and `chat`."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import zmq

from supervisor import __version__
from supervisor.logs import LOG_FILE
from workers import protocol as p

from .conftest import CLI, wait_until

SLOW_FAKE = {"kind": "fake", "priority": 10, "options": {"token_delay_s": 0.02}}


def cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def test_version_and_global_flags_after_the_command(tmp_path):
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"node-supervisor {__version__}"
    after = cli("status", "--state-dir", str(tmp_path))  # a global flag after the command
    assert after.returncode == 69 and f"no daemon socket at {tmp_path}/run/client.sock" in after.stderr, after


def test_generate_dash_reads_the_prompt_from_stdin_and_status_shows_a_dash_for_no_data(make_daemon):
    daemon = make_daemon({"f": SLOW_FAKE})
    shown = cli("--config", str(daemon.config_path), "status")
    assert "ttft p50/p95 –  per-token p50/p95 –" in shown.stdout and "None" not in shown.stdout, shown.stdout
    result = cli("--config", str(daemon.config_path), "generate", "-", "--json", "--max-tokens", "2", stdin="a b c d\n")
    done = json.loads(result.stdout.splitlines()[-1])
    assert done["event"] == "done" and done["usage"]["prompt_tokens"] == 4, result  # the fake counts prompt words


def test_generate_into_a_closed_pipe_ends_quietly_and_cancels(make_daemon):
    daemon = make_daemon({"f": SLOW_FAKE})
    command = [*CLI, "--config", str(daemon.config_path), "generate", "Hello", "--max-tokens", "5000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(10)  # as `| head -c 10`
    process.stdout.close()
    assert process.wait(timeout=60) == 141
    assert process.stderr.read() == b""  # no traceback, no "Exception ignored"
    engine = daemon.wait_for(lambda s: s["engines"][0]["in_flight"] == 0, 60)["engines"][0]
    assert engine["cancelled"] == 1, engine


def write_log(log_dir: Path, count: int) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    records = [{"timestamp": f"2031-03-01T10:00:{i:02d}Z", "level": "info", "event": f"line {i}"} for i in range(count)]
    (log_dir / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_logs_n_and_follow_start_at_the_end(tmp_path):
    write_log(tmp_path / "logs", 30)
    last_two = cli("--state-dir", str(tmp_path), "logs", "-n", "2", "--json")
    assert [json.loads(line)["event"] for line in last_two.stdout.splitlines()] == ["line 28", "line 29"]
    following = subprocess.Popen(
        [*CLI, "--state-dir", str(tmp_path), "logs", "-f", "--json"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert following.stdout is not None
        first = [json.loads(following.stdout.readline())["event"] for _ in range(10)]
        assert first == [f"line {i}" for i in range(20, 30)]  # the last ten, as tail -f
        with open(tmp_path / "logs" / LOG_FILE, "a") as log:
            log.write(json.dumps({"level": "info", "event": "new"}) + "\n")
        assert json.loads(following.stdout.readline())["event"] == "new"
    finally:
        following.kill()
        following.wait()


class ScriptedDaemon:
    """A ROUTER on the client endpoint that answers ping, and each generate with one token and done,
    keeping the messages each generate carried."""

    def __init__(self, state_dir: Path) -> None:
        (state_dir / "run").mkdir(parents=True)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.bind(f"ipc://{state_dir}/run/client.sock")
        self.generated: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                peer, payload = self.socket.recv_multipart()
            except zmq.ContextTerminated:  # close(): the socket is closed by its own thread
                self.socket.close(0)
                return
            message = json.loads(payload)
            if message["op"] == p.OP_PING:
                answers = [{"id": message["id"], "event": p.EVENT_PONG, "protocol": 1, "phase": "serving"}]
            else:
                self.generated.append(message)
                text = f"reply {len(self.generated)}"
                answers = [
                    {"id": message["id"], "event": p.EVENT_TOKEN, "text": text, "index": 0},
                    {"id": message["id"], "event": p.EVENT_DONE, "finish_reason": "stop", "usage": {}, "timings": {}},
                ]
            for answer in answers:
                self.socket.send_multipart([peer, json.dumps(answer).encode()])

    def close(self) -> None:
        self.context.term()


def test_chat_keeps_the_conversation_and_sends_it_whole_each_turn(tmp_path):
    scripted = ScriptedDaemon(tmp_path)
    try:
        result = cli(
            "--state-dir", str(tmp_path), "chat", "f", "--system", "be brief", stdin="hello\nand again\n/bye\n"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["reply 1", "reply 2"]
        wait_until(lambda: len(scripted.generated) == 2, 10, "two turns")
        second = scripted.generated[1]
        assert second["engine"] == "f" and second["stream"] is True
        assert second["messages"] == [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "reply 1"},
            {"role": "user", "content": "and again"},
        ]
    finally:
        scripted.close()
