"""The soak: injected faults under concurrent ZeroMQ and HTTP load (docs/RELIABILITY.md).

``make soak`` runs it at full size (``python -m tests.soak``: 1,000 faults or
more, fake engines and the real llama.cpp engine); tests/test_soak.py runs a
short seeded pass in the test suite.  A daemon with two fake engines (and,
with ``real_engine``, the real llama.cpp worker on the default model) serves
ZeroMQ and HTTP clients that loop on requests, while one thread injects
faults, one at a time, drawn from ``FAULTS`` with a seeded generator:

- ``worker_kill``, ``worker_stop``: SIGKILL or SIGSTOP a live worker (a
  stopped one is left for the hang detector);
- ``engine_slow``: a fake engine's token time changed through its control file;
- ``zmq_dead_client``: a ZeroMQ client sends a request and vanishes;
- ``zmq_slow_client``: one that reads its events only later;
- ``zmq_malformed``: a frame of tests/test_fuzz.py's makers;
- ``http_abuse``: one of tests/http_abuse.py's hostile or broken HTTP clients
  (malformed bodies, garbage, bodies over the limit, clients leaving before,
  during and after dispatch);
- ``http_slowloris``: connections that send part of a request head and stall;
- ``reload``: the reload op, or SIGHUP.

Afterwards: every request of the load and of the slow clients ended with
exactly one terminal event (nothing after it; an HTTP stream ends with
``[DONE]`` or one error event), none was lost (no answer within its
client's timeout), no request id has two "request end" log lines, nothing
is left in flight or queued, no worker outlives the daemon, no traceback
nor internal error is logged, and the daemon's RSS and open descriptors are
back where they were after the warm-up.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq

from supervisor.client import ClientTimeout

from .conftest import LLAMA, fake_engine
from .http_abuse import abuse_once, connect, head
from .test_fuzz import SIMPLE_MAKERS, log_problems

FAULTS = {
    "worker_kill": 4,
    "worker_stop": 1,
    "engine_slow": 1,
    "zmq_dead_client": 3,
    "zmq_slow_client": 2,
    "zmq_malformed": 3,
    "http_abuse": 5,
    "http_slowloris": 2,
    "reload": 1,
}
OK_ENDS = {"length", "stop", "cancelled", "engine_failed", "deadline_exceeded", "no_engine_available", "busy"}
OK_HTTP = {200, 429, 503, 504}
MAX_MESSAGE_BYTES = 65_536
CLIENT_TIMEOUT_S = 30.0
DEADLINE_MS = 4_000
REAL_KILL_EVERY_S = 5.0  # the real engine reloads its model after each kill: at most this often
RSS_FLAT_BYTES = 16 << 20
FDS_FLAT = 8
SLOWLORIS_HELD = 40


@dataclass
class SoakConfig:
    faults: int = 100
    seed: int = 20_261_204
    real_engine: bool = False
    zmq_clients: int = 3
    http_clients: int = 2
    pace_s: float = 0.03  # between two faults
    time_limit_s: float = 90.0


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter[str] = field(default_factory=Counter)  # by front and end
    faults: Counter[str] = field(default_factory=Counter)
    signalled: Counter[str] = field(default_factory=Counter)  # workers killed or stopped, by engine
    served_by: Counter[str] = field(default_factory=Counter)  # ZeroMQ requests ended by an engine, by engine
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    odd: list[str] = field(default_factory=list)  # ends no fault explains

    def add(self, what: str, problem: list[str] | None = None, note: str = "") -> None:
        with self.lock:
            self.requests[what] += 1
            if problem is not None:
                problem.append(note or what)


def settings_for(http_port: int) -> dict[str, Any]:
    return {
        "heartbeat_interval_s": 0.2,
        "max_message_bytes": MAX_MESSAGE_BYTES,
        "supervision": {
            "restart_backoff_base_s": 0.05,
            "restart_backoff_cap_s": 0.3,
            "kill_grace_s": 0.2,
            "circuit_failures": 100_000,
            "probe_interval_s": 0,
            "stall_timeout_s": 2.0,
        },
        "http": {
            "listen": f"127.0.0.1:{http_port}",
            "header_timeout_s": 1.0,
            "body_timeout_s": 1.0,
            "keep_alive_timeout_s": 1.0,
        },
    }


# --- load ------------------------------------------------------------------------------------------


def zmq_load(daemon: Any, n: int, engines: list[str | None], stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(n)
    client = daemon.client(timeout_s=CLIENT_TIMEOUT_S)
    i = 0
    while not stop.is_set():
        i += 1
        fields: dict[str, Any] = {"max_tokens": rng.randint(1, 8), "deadline_ms": DEADLINE_MS}
        if engine := rng.choice(engines):
            fields["engine"] = engine
        try:
            events = list(client.generate(prompt=f"z{n} r{i}", **fields))
        except ClientTimeout:
            tally.add("zmq lost", tally.lost, f"zmq client {n} request {i}: no end within {CLIENT_TIMEOUT_S}s")
            return
        end = events[-1]
        code = end.get("code") or end.get("finish_reason")
        if any(e["event"] != "token" for e in events[:-1]):
            tally.add("zmq duplicated", tally.duplicated, f"zmq {end['id']}: {[e['event'] for e in events]}")
            continue
        client.ping()  # everything sent for the request before the pong is buffered by now
        if client.buffered(end["id"]):
            tally.add("zmq duplicated", tally.duplicated, f"zmq {end['id']}: events after its end")
            continue
        tally.add(f"zmq {code}", None if code in OK_ENDS else tally.odd, f"zmq {end['id']}: {end}")
        if end.get("engine"):
            with tally.lock:
                tally.served_by[end["engine"]] += 1


def http_once(port: int, body: dict[str, Any], path: str) -> tuple[str, str | None]:
    """(end, problem) of one HTTP request: its end is the finish reason or the error code."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        answer = connection.getresponse()
        status, data = answer.status, answer.read()
    finally:
        connection.close()
    if status not in OK_HTTP:
        return f"http {status}", f"status {status}: {data[:300]!r}"
    if status != 200 or not body.get("stream"):
        payload = json.loads(data)
        if status != 200:
            return f"http {payload['error']['code']}", None
        return f"http {payload['choices'][0]['finish_reason']}", None
    ends, after, reason = [], 0, None
    for line in data.decode().splitlines():
        if not line.startswith("data: "):
            continue
        if ends:
            after += 1
        if line == "data: [DONE]":
            ends.append("done")
            continue
        event = json.loads(line[6:])
        if "error" in event:
            ends.append(event["error"]["code"])
        elif event.get("choices") and event["choices"][0].get("finish_reason"):
            reason = event["choices"][0]["finish_reason"]
    if len(ends) != 1 or after:
        return "http duplicated" if len(ends) > 1 or after else "http lost", f"stream ends {ends}, {after} after"
    return f"http {reason if ends[0] == 'done' else ends[0]}", None


def http_load(port: int, n: int, engines: list[str | None], stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(1000 + n)
    i = 0
    while not stop.is_set():
        i += 1
        chat = rng.random() < 0.5
        body: dict[str, Any] = {"max_tokens": rng.randint(1, 8), "stream": rng.random() < 0.5}
        body.update({"messages": [{"role": "user", "content": f"h{n} r{i}"}]} if chat else {"prompt": f"h{n} r{i}"})
        body["deadline_ms"] = DEADLINE_MS
        if engine := rng.choice(engines):
            body["model"] = engine
        try:
            end, problem = http_once(port, body, "/v1/chat/completions" if chat else "/v1/completions")
        except (OSError, http.client.HTTPException) as exc:
            tally.add("http lost", tally.lost, f"http client {n} request {i}: {exc!r}")
            continue
        if problem is None:
            tally.add(end, None if end.split()[-1] in OK_ENDS | {"too_many_connections"} else tally.odd, end)
        else:
            where = tally.duplicated if "duplicated" in end else tally.lost if "lost" in end else tally.odd
            tally.add(end, where, f"http client {n} request {i}: {problem}")


# --- faults ----------------------------------------------------------------------------------------


class Injector:
    def __init__(self, daemon: Any, config: SoakConfig, controls: dict[str, Path], port: int, tally: Tally) -> None:
        self.daemon, self.config, self.controls, self.port, self.tally = daemon, config, controls, port, tally
        self.rng = random.Random(config.seed)
        self.kinds = [kind for kind, weight in FAULTS.items() for _ in range(weight)]
        self.context = zmq.Context()
        self.stopped: set[int] = set()
        self.last_real_kill = 0.0
        self.slow: list[tuple[float, zmq.Socket, str]] = []  # (read at, socket, request id)
        self.malformed = self._dealer()
        self.slowloris: list[socket.socket] = []
        self.seq = 0

    def _dealer(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 200)
        sock.connect(self.daemon.endpoint)
        return sock

    def one(self) -> bool:
        """One fault; False when the one drawn could not be done now (no live worker, say)."""
        self.seq += 1
        kind = self.rng.choice(self.kinds)
        done = getattr(self, kind)()
        if done:
            self.tally.faults[kind] += 1
        self.read_slow(time.monotonic())
        while self.malformed.poll(0):
            self.malformed.recv_multipart()
        return done

    def worker_kill(self) -> bool:
        return self._signal(signal.SIGKILL)

    def worker_stop(self) -> bool:
        return self._signal(signal.SIGSTOP)

    def _signal(self, sig: int) -> bool:
        now = time.monotonic()
        live = [
            (e["name"], w["pid"])
            for e in self.daemon.status()["engines"]
            for w in e["workers"]
            if w["pid"] and w["state"] in ("ready", "loading") and w["pid"] not in self.stopped
        ]
        if sig == signal.SIGSTOP or now - self.last_real_kill < REAL_KILL_EVERY_S:
            live = [(name, pid) for name, pid in live if name in self.controls]  # not the real engine
        if not live:
            return False
        name, pid = self.rng.choice(live)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        self.tally.signalled[name] += 1
        if sig == signal.SIGSTOP:
            self.stopped.add(pid)
        if name not in self.controls:
            self.last_real_kill = now
        return True

    def engine_slow(self) -> bool:
        name = self.rng.choice(sorted(self.controls))
        self.controls[name].write_text(json.dumps({"token_delay_s": self.rng.choice([0.001, 0.004, 0.01, 0.03])}))
        return True

    def zmq_dead_client(self) -> bool:
        sock = self._dealer()
        sock.send(json.dumps({"op": "generate", "id": f"dead{self.seq}", "prompt": "x", "max_tokens": 30}).encode())
        sock.close()  # LINGER: the request leaves, its client is gone
        return True

    def zmq_slow_client(self) -> bool:
        sock = self._dealer()
        rid = f"slow{self.seq}"
        sock.send(json.dumps({"op": "generate", "id": rid, "prompt": "x", "max_tokens": 8}).encode())
        self.slow.append((time.monotonic() + self.rng.uniform(0.2, 1.0), sock, rid))
        return True

    def read_slow(self, now: float, everything: bool = False) -> None:
        """The slow clients whose time has come read their events: exactly one end, nothing after it."""
        keep = []
        for read_at, sock, rid in self.slow:
            if read_at > now and not everything:
                keep.append((read_at, sock, rid))
                continue
            events = []
            while sock.poll(int(CLIENT_TIMEOUT_S * 1000) if not events or events[-1]["event"] == "token" else 200):
                events.append(json.loads(sock.recv()))
            ends = [e for e in events if e["event"] != "token"]
            if not ends:
                self.tally.add("zmq lost", self.tally.lost, f"slow client {rid}: no end")
            elif len(ends) > 1 or events[-1] is not ends[0]:
                self.tally.add("zmq duplicated", self.tally.duplicated, f"slow client {rid}: {events}")
            else:
                code = ends[0].get("code") or ends[0].get("finish_reason")
                self.tally.add(f"zmq {code}", None if code in OK_ENDS else self.tally.odd, f"{rid}: {ends[0]}")
            sock.close(0)
        self.slow = keep

    def zmq_malformed(self) -> bool:
        frame, _ = self.rng.choice(list(SIMPLE_MAKERS.values()))(self.rng, f"m{self.seq}")
        self.malformed.send(frame[: 4 * MAX_MESSAGE_BYTES])
        return True

    def http_abuse(self) -> bool:
        abuse_once(self.rng, ("127.0.0.1", self.port), MAX_MESSAGE_BYTES)
        return True

    def http_slowloris(self) -> bool:
        for _ in range(5):
            sock = connect(("127.0.0.1", self.port), "127.0.0.2")
            sock.sendall(head("POST", "/v1/completions", 100)[: self.rng.randint(5, 60)])
            self.slowloris.append(sock)
        while len(self.slowloris) > SLOWLORIS_HELD:
            self.slowloris.pop(0).close()
        return True

    def reload(self) -> bool:
        if self.rng.random() < 0.5:
            with self.daemon.client(timeout_s=10) as client:
                return client.reload()["event"] == "reloaded"
        os.kill(self.daemon.process.pid, signal.SIGHUP)
        return True

    def close(self) -> None:
        self.read_slow(time.monotonic(), everything=True)
        for sock in self.slowloris:
            sock.close()
        self.malformed.close(0)
        self.context.term()


# --- the run ---------------------------------------------------------------------------------------


def daemon_figures(pid: int) -> tuple[int, int]:
    process = psutil.Process(pid)
    return process.memory_info().rss, process.num_fds()


def idle(daemon: Any) -> bool:
    return all(not e["in_flight"] and not e["queue_depth"] for e in daemon.status()["engines"])


def wait(predicate: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    return predicate()


def run_soak(make: Callable[..., Any], tmp_path: Path, config: SoakConfig, free_port: Callable[[], int]) -> dict:
    """Run the soak on a daemon made by ``make(engines, **settings)``; the report (its ``problems`` empty when all held)."""
    engines: dict[str, dict[str, Any]] = {}
    controls: dict[str, Path] = {}
    for name, priority in (("a", 10), ("b", 20)):
        engines[name], controls[name] = fake_engine(tmp_path, name, priority, token_delay_s=0.004)
    targets: list[str | None] = [None, None, "a", "b"]
    if config.real_engine:
        engines["llama"] = {**LLAMA, "priority": 30}
        targets.append("llama")
    port = free_port()
    daemon = make(engines, **settings_for(port))
    pid = daemon.status()["daemon"]["pid"]
    tally = Tally()
    stop = threading.Event()
    threads = [
        threading.Thread(target=zmq_load, args=(daemon, n, targets, stop, tally)) for n in range(config.zmq_clients)
    ]
    threads += [
        threading.Thread(target=http_load, args=(port, n, targets, stop, tally)) for n in range(config.http_clients)
    ]
    for thread in threads:
        thread.start()
    wait(lambda: sum(tally.requests.values()) >= 20, 30)
    rss_start, fds_start = daemon_figures(pid)
    injector = Injector(daemon, config, controls, port, tally)
    started = time.monotonic()
    give_up = started + config.time_limit_s
    while sum(tally.faults.values()) < config.faults and time.monotonic() < give_up:
        injector.one()
        time.sleep(config.pace_s)
    injector.close()
    faulted_s = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S + 10)
    for control in controls.values():
        control.write_text("{}")
    problems: list[str] = []
    if any(thread.is_alive() for thread in threads):
        problems.append("a load client is still waiting for an answer")
    if not wait(lambda: idle(daemon), 30):
        problems.append(f"requests left in flight or queued: {daemon.status()['engines']}")
    for stopped in injector.stopped:  # a stopped worker the hang detector has not reached yet
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:
            pass
    # Descriptors back: slow connections closed at their deadlines, workers restarted.
    settled = wait(lambda: (f := daemon_figures(pid))[1] <= fds_start + FDS_FLAT and f, 15) or daemon_figures(pid)
    rss_end, fds_end = settled
    ended_s = time.monotonic() - started
    log = daemon.log_text()
    ends = Counter(json.loads(line).get("request_id") for line in log.splitlines() if '"request end"' in line)
    twice = [rid for rid, n in ends.items() if n > 1]
    bad_lines, kinds = log_problems(log)
    marker = str(daemon.state_dir)
    daemon.stop()
    leftovers = [
        proc.pid
        for proc in psutil.process_iter(["cmdline"])
        if proc.info["cmdline"] and any(marker in part for part in proc.info["cmdline"])
    ]
    faults = sum(tally.faults.values())
    requests = sum(tally.requests.values())
    if faults < config.faults:
        problems.append(f"only {faults} of {config.faults} faults injected in {config.time_limit_s}s")
    for what, found in (("lost", tally.lost), ("duplicated", tally.duplicated), ("unexplained", tally.odd)):
        if found:
            problems.append(f"{len(found)} {what} requests, e.g. {found[:3]}")
    if twice:
        problems.append(f"{len(twice)} request ids with two 'request end' lines, e.g. {twice[:3]}")
    if leftovers:
        problems.append(f"processes left after the daemon stopped: {leftovers}")
    if bad_lines:
        problems.append(f"{len(bad_lines)} log lines with an internal error or traceback: {dict(kinds)}")
    if rss_end - rss_start > RSS_FLAT_BYTES:
        problems.append(f"RSS grew from {rss_start >> 20} to {rss_end >> 20} MiB")
    if fds_end > fds_start + FDS_FLAT:
        problems.append(f"open descriptors grew from {fds_start} to {fds_end}")
    return {
        "seed": config.seed,
        "engines": sorted(engines),
        "faults": faults,
        "faults_by_kind": dict(sorted(tally.faults.items())),
        "workers_signalled_by_engine": dict(sorted(tally.signalled.items())),
        "requests": requests,
        "zmq_ends_by_engine": dict(sorted(tally.served_by.items())),
        "requests_by_end": dict(tally.requests.most_common()),
        "request_end_lines": sum(ends.values()),
        "fault_phase_s": round(faulted_s, 1),
        "duration_s": round(ended_s, 1),
        "lost": len(tally.lost),
        "duplicated": len(tally.duplicated) + len(twice),
        "orphans": len(leftovers),
        "rss_mib": [round(rss_start / 2**20, 1), round(rss_end / 2**20, 1)],
        "fds": [fds_start, fds_end],
        "problems": problems,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=SoakConfig.seed)
    parser.add_argument("--fake-only", action="store_true", help="no real llama.cpp engine")
    parser.add_argument("--zmq-clients", type=int, default=3)
    parser.add_argument("--http-clients", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=1800.0)
    parser.add_argument("--report", type=Path, help="write the report there as JSON")
    args = parser.parse_args()
    import tempfile

    from supervisor.node.models import ensure_default_model

    from .conftest import Daemon, shared_settings
    from .test_http import free_port

    settings = shared_settings()
    shared = {
        "envs_dir": settings.envs_dir,
        "data_dir": settings.data_dir,
        "model": ensure_default_model(settings, print),
    }
    started: list[Any] = []

    def make(engines: dict[str, Any], **options: Any) -> Any:
        daemon = Daemon(shared, engines, **options)
        started.append(daemon)
        return daemon.start()

    config = SoakConfig(
        faults=args.faults,
        seed=args.seed,
        real_engine=not args.fake_only,
        zmq_clients=args.zmq_clients,
        http_clients=args.http_clients,
        time_limit_s=args.time_limit,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            report = run_soak(make, Path(tmp), config, free_port)
    finally:
        for daemon in started:
            daemon.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    raise SystemExit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
