"""The worker protocol, spoken by a real worker process without the daemon.

A small harness binds its own ROUTER socket and plays the daemon's part: it
starts ``python -m workers --engine fake`` in the fake engine's environment
(this checkout's workers/ on PYTHONPATH), answers heartbeats, and sends
``load`` and ``generate``.  The tests look at what the worker puts on the
wire: the routing ids of its two sockets (which carry the per-spawn secret),
and token messages that count tokens, not messages.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import pytest
import zmq

from supervisor.node.envs import create_env, env_is_current, env_python
from workers import protocol as p
from workers.protocol import messages as m

from .conftest import checkout_worker_environ, shared_settings

WORKER_ID = "w.1"
SECRET = "s3cr3t-7f1c9a"
HEARTBEAT_S = 0.5  # the worker exits after 3 silent intervals; the harness answers every heartbeat
TIMEOUT_S = 60.0  # a worker start on a busy machine (interpreter, pyzmq)


def fake_env_python() -> Path:
    """The fake engine environment's interpreter (pyzmq only), created if missing."""
    settings = shared_settings()
    if not env_is_current(settings, "fake", "fake"):
        create_env(settings, "fake", "fake", lambda line: print(line, flush=True))
    return env_python(settings.envs_dir / "fake")


worker_environ = checkout_worker_environ


class FakeDaemon:
    """The daemon's side of the worker conversation, on a ROUTER socket of its own."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.endpoint = f"ipc://{directory}/workers.sock"
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.endpoint)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.inbox: deque[tuple[bytes, bytes]] = deque()  # (routing id, frame) from main sockets
        self.heartbeats: list[dict[str, Any]] = []
        self.routing_ids: set[bytes] = set()

    def spawn(self, secret: str | None) -> subprocess.Popen[bytes]:
        command = [
            str(fake_env_python()),
            "-m",
            "workers",
            "--engine",
            "fake",
            "--endpoint",
            self.endpoint,
            "--worker-id",
            WORKER_ID,
            "--heartbeat-interval",
            str(HEARTBEAT_S),
        ]
        with open(self.directory / f"worker{len(self.processes)}.log", "wb") as log:
            process = subprocess.Popen(command, env=worker_environ(secret), stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def _pump(self, deadline: float) -> None:
        """Take in one frame if one comes before ``deadline``; heartbeats are answered, not queued."""
        if not self.router.poll(max(0.0, deadline - time.monotonic()) * 1000):
            return
        routing_id, frame = self.router.recv_multipart()
        self.routing_ids.add(routing_id)
        if routing_id.endswith(p.WATCHDOG_SUFFIX.encode()):
            self.heartbeats.append(p.decode(frame))
            self.router.send_multipart([routing_id, p.encode({"type": m.DaemonHeartbeat.TYPE})])
        else:
            self.inbox.append((routing_id, frame))

    def receive(self, timeout: float = TIMEOUT_S) -> tuple[bytes, bytes]:
        """The next (routing id, frame) from a worker's main socket."""
        deadline = time.monotonic() + timeout
        while not self.inbox and time.monotonic() < deadline:
            self._pump(deadline)
        if not self.inbox:
            pytest.fail(f"no message from the worker in {timeout}s; its output:\n{self.output()}")
        return self.inbox.popleft()

    def expect(self, kind: str) -> tuple[bytes, dict[str, Any]]:
        """The next main-socket message, which must be of type ``kind``."""
        routing_id, frame = self.receive()
        message = p.decode(frame)
        assert message.get("type") == kind, message
        return routing_id, message

    def wait_for_heartbeat(self, predicate: Any, timeout: float = TIMEOUT_S) -> dict[str, Any]:
        """The first heartbeat, received so far or before the timeout, that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while not any(predicate(h) for h in self.heartbeats) and time.monotonic() < deadline:
            self._pump(deadline)
        found = [h for h in self.heartbeats if predicate(h)]
        assert found, f"no such heartbeat in {timeout}s; the last ones: {self.heartbeats[-3:]}"
        return found[0]

    def send(self, routing_id: bytes, **message: Any) -> None:
        self.router.send_multipart([routing_id, p.encode(message)])

    def wait_exit(self, process: subprocess.Popen[bytes], timeout: float = TIMEOUT_S) -> int:
        """Wait for the worker to exit, answering its heartbeats meanwhile so it is not orphaned."""
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            self._pump(min(deadline, time.monotonic() + 0.1))
        assert process.poll() is not None, "the worker did not exit"
        return process.returncode

    def output(self) -> str:
        return "\n".join(f.read_text(errors="replace")[-3000:] for f in sorted(self.directory.glob("worker*.log")))

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.router.close()
        self.context.term()


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    # A short directory: ipc socket paths are limited to about 100 characters.
    directory = Path(tempfile.mkdtemp(prefix="wp-"))
    harness = FakeDaemon(directory)
    try:
        yield harness
    finally:
        harness.close()
        shutil.rmtree(directory, ignore_errors=True)


def start_and_load(daemon: FakeDaemon, options: dict[str, Any]) -> bytes:
    """Spawn a worker with the secret, load the fake model; return the main routing id."""
    daemon.spawn(SECRET)
    routing_id, _hello = daemon.expect(m.Hello.TYPE)
    daemon.send(routing_id, type=m.Load.TYPE, protocol=p.PROTOCOL_VERSION, spec={"model": "fake", "options": options})
    while True:
        got_id, frame = daemon.receive()
        message = p.decode(frame)
        assert got_id == routing_id and message["type"] in (m.Loading.TYPE, m.Ready.TYPE), message
        if message["type"] == m.Ready.TYPE:
            return routing_id


def generate(
    daemon: FakeDaemon, routing_id: bytes, request_id: str, max_tokens: int
) -> tuple[list[bytes], dict[str, Any]]:
    """Run one request; (the raw token frames, the done message)."""
    daemon.send(
        routing_id, type=m.Generate.TYPE, request_id=request_id, prompt="hello there", params={"max_tokens": max_tokens}
    )
    frames: list[bytes] = []
    while True:
        got_id, frame = daemon.receive()
        message = p.decode(frame)
        assert got_id == routing_id and message["type"] in (m.Token.TYPE, m.Done.TYPE), message
        if message["type"] == m.Done.TYPE:
            return frames, message
        frames.append(frame)


# --- routing ids and the secret ----------------------------------------------


def test_routing_ids_carry_the_secret_and_hello_the_plain_worker_id(daemon: FakeDaemon) -> None:
    process = daemon.spawn(SECRET)
    routing_id, hello = daemon.expect(m.Hello.TYPE)
    main_id = f"{WORKER_ID}#{SECRET}".encode()
    assert routing_id == main_id == p.worker_routing_id(WORKER_ID, SECRET).encode()
    assert hello["worker_id"] == WORKER_ID
    heartbeat = daemon.wait_for_heartbeat(lambda h: True)
    assert heartbeat["type"] == m.Heartbeat.TYPE
    assert daemon.routing_ids == {main_id, main_id + b"/watchdog"}
    assert p.watchdog_identity(main_id.decode()).encode() == main_id + b"/watchdog"
    daemon.send(routing_id, type=m.Shutdown.TYPE)
    assert daemon.wait_exit(process) == p.ExitCode.OK


def test_the_secret_is_neither_on_the_command_line_nor_left_for_engine_code(daemon: FakeDaemon) -> None:
    process = daemon.spawn(SECRET)
    _, hello = daemon.expect(m.Hello.TYPE)
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    assert b"--worker-id\0w.1\0" in cmdline  # it is the worker's command line
    assert SECRET.encode() not in cmdline
    # The fake engine reports whether it can read the variable (os.environ or
    # the C library's getenv): the worker must have removed it before loading it.
    assert hello["versions"]["sees_worker_secret"] is False


def test_without_a_secret_the_routing_ids_are_the_worker_id(daemon: FakeDaemon) -> None:
    daemon.spawn(None)
    routing_id, hello = daemon.expect(m.Hello.TYPE)
    assert routing_id == WORKER_ID.encode() and hello["worker_id"] == WORKER_ID
    daemon.wait_for_heartbeat(lambda h: True)
    assert daemon.routing_ids == {WORKER_ID.encode(), f"{WORKER_ID}/watchdog".encode()}


# --- token counts --------------------------------------------------------------


def test_token_messages_carry_token_counts_that_add_up_to_the_usage(daemon: FakeDaemon) -> None:
    routing_id = start_and_load(daemon, {"tokens_per_event": 3})
    frames, done = generate(daemon, routing_id, "r-1", max_tokens=10)
    messages = [json.loads(frame) for frame in frames]
    assert [m.get("tokens", 1) for m in messages] == [3, 3, 3, 1]
    # Several tokens: an ordinary JSON message with "tokens"; one token: the
    # fast form, byte for byte, without "tokens".
    assert frames[0] == p.encode({"type": m.Token.TYPE, "request_id": "r-1", "text": messages[0]["text"], "tokens": 3})
    assert frames[-1] == p.token_frame_prefix("r-1") + p.encode_string(messages[-1]["text"]) + b"}"
    assert "tokens" not in messages[-1]
    assert len("".join(m["text"] for m in messages).split()) == 10
    assert done["usage"]["completion_tokens"] == sum(m.get("tokens", 1) for m in messages) == 10
    # The heartbeat counts tokens too, not token messages.
    daemon.wait_for_heartbeat(lambda h: h["phase"] == "idle" and h["tokens"] == 10)


def test_one_token_per_event_keeps_the_fast_form(daemon: FakeDaemon) -> None:
    routing_id = start_and_load(daemon, {})
    frames, done = generate(daemon, routing_id, "r-2", max_tokens=4)
    prefix = p.token_frame_prefix("r-2")
    assert len(frames) == 4 and all(f.startswith(prefix) and f.endswith(b'"}') for f in frames)
    assert done["usage"]["completion_tokens"] == 4


def test_text_held_back_is_sent_with_the_count_of_the_tokens_it_holds() -> None:
    """llama.cpp's text stream: a piece counts the tokens whose text begins in it."""
    from workers.textstream import TextAssembler

    def pieces(stop: list[str], tokens: list[bytes]) -> list[tuple[str, int]]:
        assembler = TextAssembler(stop)
        out = [(assembler.feed(token), assembler.take_tokens()) for token in tokens]
        out.append((assembler.flush(), assembler.take_tokens()))
        return [piece for piece in out if piece[0]]

    snowman = "☃".encode()
    # A character split over three tokens: one piece, three tokens.
    assert pieces([], [snowman[:1], snowman[1:2], snowman[2:], b"!"]) == [("☃", 3), ("!", 1)]
    # Text held back for a stop string goes out with the token that settles it.
    assert pieces(["END"], [b"a E", b"N", b"o"]) == [("a ", 1), ("ENo", 2)]
    # The tokens of a stop string are never sent, so never counted.
    assert pieces(["END"], [b"a E", b"N", b"D", b"more"]) == [("a ", 1)]
    # What is left of a counted token carries no token of its own.
    assert pieces(["bz"], [b"ab"]) == [("a", 1), ("b", 0)]
