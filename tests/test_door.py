"""The HTTP front under abuse (docs/HTTP.md, "Limits"): deadlines, connection limits, the descriptor
budget, quiet disconnects, 413, and memory handed back after large frames and bodies.

Real daemons with fake engines; hostile clients on raw loopback sockets (tests/http_abuse.py). The
per-address limits use other loopback addresses (127.0.0.2, …) as other clients.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
import urllib.request

import psutil
import zmq

from supervisor.config import load_settings

from .conftest import collect, wait_until
from .http_abuse import (
    IO_TIMEOUT_S,
    abuse_once,
    closed_by_peer,
    connect,
    head,
    log_complaints,
    read_answer,
    request,
)
from .test_http import free_port

FAKE = {"kind": "fake", "priority": 10, "options": {"token_delay_s": 0.002}}
COMPLETION = json.dumps({"prompt": "x", "max_tokens": 2}).encode()


def address(daemon) -> tuple[str, int]:
    host, port = load_settings(daemon.config_path).http.listen.rsplit(":", 1)
    return host, int(port)


def http_daemon(make_daemon, max_message_bytes: int = 1 << 20, start: bool = True, **http):
    settings = {
        "http": {"listen": f"127.0.0.1:{free_port()}", **http},
        "metrics": {"listen": "127.0.0.1:0"},
        "max_message_bytes": max_message_bytes,
    }
    return make_daemon({"f": FAKE}, start=start, **settings)


def served(daemon, source: str = "127.0.0.1") -> bool:
    status, _, body = request(address(daemon), "/v1/completions", COMPLETION, source)
    return status == 200 and json.loads(body)["choices"][0]["finish_reason"] == "length"


def metric(daemon, name: str, url: str | None = None, **labels: str) -> float:
    """One figure, scraped from the HTTP front (or from ``url``, the [metrics] server, when HTTP is full)."""
    url = url or f"http://{load_settings(daemon.config_path).http.listen}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(want + " "))


def test_slow_headers_slow_bodies_and_idle_connections_are_closed_at_their_limits(make_daemon):
    daemon = http_daemon(make_daemon, header_timeout_s=1.0, body_timeout_s=1.5, keep_alive_timeout_s=1.0)
    where = address(daemon)
    slow_headers = [connect(where, "127.0.0.2") for _ in range(30)]
    for sock in slow_headers:
        sock.sendall(head("POST", "/v1/completions", 100)[:20])  # the request line, part of a header
    silent = [connect(where, "127.0.0.3") for _ in range(10)]  # connected, nothing sent
    slow_bodies = [connect(where, "127.0.0.4") for _ in range(30)]
    for sock in slow_bodies:
        sock.sendall(head("POST", "/v1/completions", 1000) + b'{"prompt": "')
    idle = connect(where)
    idle.sendall(head("POST", "/v1/completions", len(COMPLETION)) + COMPLETION)
    assert read_answer(idle)[0] == 200  # kept alive, then idle
    assert served(daemon)  # while they all hang on
    for sock in slow_headers + silent + slow_bodies + [idle]:
        assert closed_by_peer(sock, 5.0), "a slow or idle connection was still open 5 s after its limit"
        sock.close()
    assert served(daemon)
    assert metric(daemon, "node_supervisor_http_timeouts_total", phase="header") == 40
    assert metric(daemon, "node_supervisor_http_timeouts_total", phase="body") == 30
    assert metric(daemon, "node_supervisor_http_connections_open") == 1  # the scrape's own
    assert not log_complaints(daemon.log_text())


def refused(sock: socket.socket) -> dict:
    sock.sendall(head("POST", "/v1/completions", len(COMPLETION)) + COMPLETION)
    status, headers, body = read_answer(sock)
    assert status == 503, (status, body)
    assert headers["retry-after"] == "1" and headers["connection"] == "close"
    assert closed_by_peer(sock, IO_TIMEOUT_S)
    return json.loads(body)["error"]


def test_connection_limits_overall_and_per_address_are_answered_503_and_recover(make_daemon):
    daemon = http_daemon(make_daemon, max_connections=10, max_connections_per_client=4, header_timeout_s=60)
    where = address(daemon)
    held = [connect(where, "127.0.0.2") for _ in range(4)]  # the daemon accepts connections in their order
    error = refused(connect(where, "127.0.0.2"))
    assert error == {
        "message": "too many connections from this address; retry later",
        "type": "server_error",
        "param": None,
        "code": "too_many_connections",
    }
    assert served(daemon, "127.0.0.3")  # another address is not held back
    held += [connect(where, f"127.0.0.{n}") for n in (3, 3, 4, 4, 5, 5)]
    assert refused(connect(where, "127.0.0.6"))["message"] == "too many connections; retry later"
    for sock in held:
        sock.close()
    wait_until(lambda: served(daemon, "127.0.0.2"), 10, "a request served once the connections closed")
    assert metric(daemon, "node_supervisor_http_connections_refused_total", reason="client_busy") == 1
    assert metric(daemon, "node_supervisor_http_connections_refused_total", reason="busy") >= 1  # and retries
    assert not log_complaints(daemon.log_text())


def test_the_descriptor_budget_keeps_http_from_starving_zeromq_and_worker_restarts(make_daemon):
    nofile = 400
    daemon = http_daemon(make_daemon, start=False, fd_reserve=300, header_timeout_s=60)
    daemon.nofile = nofile
    daemon.start()
    status = daemon.status()["daemon"]
    pid, metrics_url = status["pid"], status["metrics_url"]
    assert psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE) == (nofile, nofile)
    where = address(daemon)
    flood = []
    for n in range(nofile + 100):  # past the daemon's whole descriptor limit
        try:
            flood.append(connect(where, f"127.0.1.{n % 200 + 1}"))
        except OSError:
            break
    wait_until(
        lambda: metric(daemon, "node_supervisor_http_connections_refused_total", metrics_url, reason="budget") > 0,
        10,
        "connections past the budget closed",
    )
    open_fds = psutil.Process(pid).num_fds()
    assert open_fds < nofile - 200, f"{open_fds} descriptors open with HTTP flooded; the limit is {nofile}"
    # ZeroMQ clients, new ones included, are served while the flood holds.
    context = zmq.Context()
    clients = [daemon.client(timeout_s=10) for _ in range(20)]
    for i, client in enumerate(clients):
        assert collect(client.generate(prompt=f"z{i}", max_tokens=2))[1]["event"] == "done"
    # A worker restart needs descriptors for its pipes and sockets.
    worker = daemon.engine("f")["workers"][0]["pid"]
    os.kill(worker, signal.SIGKILL)
    daemon.wait_for(lambda s: s["engines"][0]["state"] == "ready" and s["engines"][0]["workers"][0]["pid"] != worker)
    assert collect(clients[0].generate(prompt="after the restart", max_tokens=2))[1]["event"] == "done"
    for sock in flood:
        sock.close()
    context.term()
    wait_until(lambda: served(daemon), 10, "HTTP served once the flood is gone")
    log = daemon.log_text()
    assert "Too many open files" not in log and "EMFILE" not in log
    assert "the descriptor limit bounds http connections" in log  # said at start: 100 < max_connections


def test_a_body_over_the_limit_is_413_and_read_no_further(make_daemon):
    limit = 64 << 10
    daemon = http_daemon(make_daemon, max_message_bytes=limit)
    where = address(daemon)
    with connect(where) as sock:  # declared too large: answered before any of the body is sent
        sock.sendall(head("POST", "/v1/chat/completions", 50 << 20))
        status, headers, body = read_answer(sock)
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "message_too_large"
        assert closed_by_peer(sock, IO_TIMEOUT_S)
    with connect(where) as sock:  # chunked: answered at the limit, the connection closed while the client still sends
        sock.sendall(head("POST", "/v1/completions", None, "Transfer-Encoding: chunked\r\n"))
        sent, most = 0, 64 << 20
        try:
            while sent < most:
                sock.sendall(b"1000\r\n" + b"x" * 4096 + b"\r\n")
                sent += 4096
        except ConnectionError:
            pass
        # The limit, then at most LINGER_BYTES dropped, and what the sockets' buffers hold.
        assert sent < 16 << 20, f"the daemon took {sent >> 20} MiB of a chunked body"
    body = json.dumps({"prompt": "x" * (limit - 100), "max_tokens": 1}).encode()
    assert request(where, "/v1/completions", body)[0] == 200  # just under the limit is fine
    assert served(daemon)


def test_disconnects_and_an_abuse_pass_leave_nothing_above_warning_in_the_log(make_daemon):
    limit = 64 << 10
    daemon = http_daemon(make_daemon, max_message_bytes=limit, header_timeout_s=2.0, body_timeout_s=2.0)
    where = address(daemon)
    rng = random.Random(20_261_204)
    statuses: dict[str, set] = {}
    deadline = time.monotonic() + 60
    for _ in range(400):
        name, status = abuse_once(rng, where, limit)
        statuses.setdefault(name, set()).add(status)
        assert time.monotonic() < deadline, "the abuse pass ran out of time"
    print(statuses)
    answered = {s for found in statuses.values() for s in found if s is not None}
    assert not {s for s in answered if s >= 500 and s != 503}, statuses
    assert statuses["over_limit"] == {413} and statuses["over_limit_chunked"] <= {413, None}
    assert {400, 404, 405, 413} <= answered
    assert served(daemon)
    complaints = log_complaints(daemon.log_text())
    assert not complaints, f"{len(complaints)} log lines with a traceback or above warning:\n" + "\n".join(
        complaints[:5]
    )
    wait_until(lambda: metric(daemon, "node_supervisor_http_client_gone_early_total") > 0, 10, "early leavers counted")


def test_rss_returns_near_its_start_after_a_burst_of_large_frames_and_bodies(make_daemon):
    daemon = http_daemon(make_daemon)  # max_message_bytes 1 MiB: ZeroMQ frames up to 16 MiB are read
    where = address(daemon)
    process = psutil.Process(daemon.status()["daemon"]["pid"])
    for _ in range(20):
        assert served(daemon)
    time.sleep(1.0)  # the warm-up's own trim
    before = process.memory_info().rss
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    frame = b'{"op":"ping","id":"big","x":"' + b"x" * (12 << 20) + b'"}'
    for _ in range(20):
        sock.send(frame)
    for _ in range(20):
        assert sock.poll(30_000), "no answer to a large frame"
        assert json.loads(sock.recv())["code"] == "message_too_large"
    sock.close()
    context.term()
    big = json.dumps({"prompt": "x" * ((1 << 20) - 200), "max_tokens": 1}).encode()
    for _ in range(10):
        assert request(where, "/v1/completions", big)[0] == 200
        assert request(where, "/v1/completions", big + b"x" * 1000)[0] == 413
    peak = process.memory_info().rss
    settled = wait_until(
        lambda: (rss := process.memory_info().rss) <= before + (10 << 20) and rss, 15, "RSS back within 10 MB"
    )
    print(f"RSS before {before >> 20} MiB, after the burst {peak >> 20} MiB, settled {settled >> 20} MiB")


def test_headers_without_end_are_cut_at_the_size_bound(make_daemon):
    daemon = http_daemon(make_daemon)
    with connect(address(daemon)) as sock:
        sock.sendall(head("POST", "/v1/completions", 10)[:-2])
        try:
            for i in range(2_000):  # 2,000 headers of 100 bytes
                sock.sendall(b"X-Filler-%d: %s\r\n" % (i, b"y" * 84))
        except ConnectionError:
            pass
        status, _, body = read_answer(sock)  # the connection lingers: the answer is read, not reset away
        assert status == 431 and json.loads(body)["error"]["type"] == "invalid_request_error"
    assert metric(daemon, "node_supervisor_http_connections_refused_total", reason="head_too_large") == 1
    assert served(daemon)
    assert metric(daemon, "node_supervisor_http_connections_open") == 1


def test_connections_past_twice_the_limit_are_closed_unread(make_daemon):
    daemon = http_daemon(make_daemon, max_connections=5, header_timeout_s=60)
    where = address(daemon)
    held = [connect(where, f"127.0.2.{n}") for n in range(10)]  # 5 served, 5 waiting for their 503
    extra = connect(where, "127.0.3.1")
    assert closed_by_peer(extra, IO_TIMEOUT_S)  # closed as soon as accepted, without an answer
    assert refused(held[-1])["code"] == "too_many_connections"
    for sock in held:
        sock.close()
    wait_until(lambda: served(daemon), 10, "a request served once the connections closed")
    assert metric(daemon, "node_supervisor_http_connections_refused_total", reason="overflow") >= 1
