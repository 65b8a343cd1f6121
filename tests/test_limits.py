"""The limits PROTOCOL.md promises, enforced where they are promised, and who may speak on the worker endpoint."""

from __future__ import annotations

import json
import os
import signal

import psutil
import zmq

from .conftest import collect, wait_until

FAST_FAKE = {"kind": "fake", "priority": 10, "options": {"token_delay_s": 0}}
BACKLOG_LIMIT = 100_000  # docs/PROTOCOL.md: events held for a client that does not read


def request_end_lines(daemon):
    lines = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request end"]


def test_a_client_that_stops_reading_is_cut_off_at_the_documented_backlog_through_the_terminal_path(make_daemon):
    daemon = make_daemon({"f": FAST_FAKE}, max_tokens_limit=1_000_000)
    context = zmq.Context()
    slow = context.socket(zmq.DEALER)
    slow.setsockopt(zmq.LINGER, 0)
    slow.connect(daemon.endpoint)
    try:
        slow.send(json.dumps({"op": "generate", "id": "never-read", "prompt": "x", "max_tokens": 300_000}).encode())
        ended = wait_until(
            lambda: [e for e in request_end_lines(daemon) if e["request_id"] == "never-read"], 120, "the request's end"
        )
    finally:
        slow.close()
        context.term()
    (end,) = ended
    assert end["outcome"] == "done" and end["finish_reason"] == "cancelled", end
    assert BACKLOG_LIMIT <= end["tokens"] < 300_000, (
        end
    )  # cut at the documented limit, not ~2,000, and not run to the end
    engine = daemon.engine("f")
    assert engine["failed"] == 0 and engine["cancelled"] == 1  # counted apart from failures
    assert daemon.status()["daemon"]["requests_in_progress"] == 0
    _, done = collect(daemon.client().generate(prompt="x", max_tokens=3))
    assert done["event"] == "done"


def test_a_frame_above_the_hard_limit_is_never_read(make_daemon):
    daemon = make_daemon({"f": FAST_FAKE}, max_message_bytes=65536)  # hard limit: 16 MiB
    rss_before = psutil.Process(daemon.process.pid).memory_info().rss
    context = zmq.Context()
    huge = context.socket(zmq.DEALER)
    huge.setsockopt(zmq.LINGER, 0)
    huge.connect(daemon.endpoint)
    try:
        huge.send(b'{"op":"ping","id":"' + b"x" * (64 << 20) + b'"}')
        assert huge.poll(2000) == 0  # dropped unread: no message_too_large for a frame this size
    finally:
        huge.close()
        context.term()
    assert daemon.client().ping()["event"] == "pong"
    assert psutil.Process(daemon.process.pid).memory_info().rss - rss_before < 48 << 20


def test_a_local_process_claiming_a_worker_id_is_refused_and_the_real_worker_registers(make_daemon):
    daemon = make_daemon({"f": {"kind": "fake", "priority": 10}}, heartbeat_interval_s=0.3)
    first = daemon.engine("f")["workers"][0]
    worker_endpoint = f"ipc://{daemon.state_dir}/run/workers.sock"
    context = zmq.Context()
    rogues = []
    try:
        for identity in ("f.1", "f.2", "f.2/watchdog"):
            rogue = context.socket(zmq.DEALER)
            rogue.setsockopt(zmq.LINGER, 0)
            rogue.setsockopt(zmq.IDENTITY, identity.encode())
            rogue.connect(worker_endpoint)
            rogue.send(json.dumps({"type": "hello", "protocol": 1, "worker_id": identity, "pid": os.getpid()}).encode())
            rogues.append(rogue)
        os.kill(first["pid"], signal.SIGKILL)  # its replacement will be f.2, the id a rogue already holds
        daemon.wait_for(
            lambda s: s["engines"][0]["workers"][0]["id"] == "f.2" and s["engines"][0]["state"] == "ready", timeout=30
        )
        _, done = collect(daemon.client().generate(prompt="x", max_tokens=3))
        assert done["event"] == "done" and done["worker"] == "f.2"
        assert all(rogue.poll(0) == 0 for rogue in rogues)  # told nothing, not even to shut down
    finally:
        for rogue in rogues:
            rogue.close()
        context.term()
    assert daemon.engine("f")["circuit"] == "closed"
    assert "message from an unknown peer on the worker endpoint refused" in daemon.log_text()
