"""Supervision with faults injected into real processes: the real llama.cpp worker and the fake engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import zmq

from workers import protocol as p

from .conftest import LLAMA, assert_nothing_after, collect, fake_engine

LONG = {"prompt": "Once upon a time", "ignore_eos": True, "temperature": 0.0, "seed": 7}
FAST = {
    "heartbeat_interval_s": 0.3,
    "supervision": {
        "restart_backoff_base_s": 0.2,
        "restart_backoff_cap_s": 1.0,
        "kill_grace_s": 0.5,
        "probe_interval_s": 0,
    },
}


class Events:
    """A subscriber to the daemon's event feed, collecting in the background."""

    def __init__(self, daemon) -> None:
        daemon.wait_for(lambda status: True)  # the daemon answers: its PUB socket is bound
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, "")
        self.sub.connect(f"ipc://{daemon.state_dir}/run/events.sock")
        self.seen: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.wait("feed.subscribed")  # the daemon has the subscription: nothing from now on is missed

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sub.poll(50):
                self.seen.append(p.decode(self.sub.recv_multipart()[1]))

    def of(self, topic: str) -> list[dict[str, Any]]:
        return [e for e in list(self.seen) if e["topic"] == topic]

    def wait(self, topic: str, predicate=lambda e: True, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.of(topic):
                if predicate(event):
                    return event
            time.sleep(0.02)
        pytest.fail(
            f"no {topic} event within {timeout}s; seen: {[(e['topic'], e.get('engine'), e.get('new'), e.get('to')) for e in self.seen]}"
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sub.close()
        self.context.term()


def worker_pid(daemon, engine: str = "llama") -> int:
    return daemon.engine(engine)["workers"][0]["pid"]


def read_tokens(client, request_id: str, count: int) -> int:
    seen = 0
    for event in client.events(request_id):
        assert event["event"] == "token", event
        seen += 1
        if seen == count:
            return seen
    raise AssertionError("stream ended early")


@pytest.mark.real_engine
def test_sigkill_mid_stream_fails_that_request_and_the_queued_one_is_served_by_the_restart(make_daemon):
    daemon = make_daemon({"llama": LLAMA}, **FAST)
    events = Events(daemon)
    streaming, waiting = daemon.client(), daemon.client()
    first = streaming.send({"op": "generate", "max_tokens": 400, **LONG})
    got = read_tokens(streaming, first, 3)
    second = waiting.send({"op": "generate", "prompt": "Hello", "max_tokens": 8})
    daemon.wait_for(lambda s: s["engines"][0]["queue_depth"] == 1)
    killed_pid = worker_pid(daemon)
    os.kill(killed_pid, signal.SIGKILL)
    rest, terminal = collect(streaming.events(first))
    assert terminal["event"] == "error" and terminal["code"] == "engine_failed", terminal
    assert terminal["usage"]["completion_tokens"] == got + len(rest)
    assert "SIGKILL" in terminal["message"]
    _, done = collect(waiting.events(second))
    assert done["event"] == "done" and done["worker"] == "llama.2", done
    worker = daemon.engine("llama")["workers"][0]
    assert worker["last_exit"]["signal"] == "SIGKILL" and worker["restarts"] == 1 and worker["pid"] != killed_pid
    exit_event = events.wait("worker.exit")
    assert exit_event["signal"] == "SIGKILL" and exit_event["worker_id"] == "llama.1"
    assert_nothing_after(streaming, first)
    events.close()


@pytest.mark.real_engine
def test_sigstop_is_detected_as_a_hang_and_the_worker_is_replaced(make_daemon):
    daemon = make_daemon({"llama": LLAMA}, **FAST)
    events = Events(daemon)
    client = daemon.client()
    request_id = client.send({"op": "generate", "max_tokens": 400, **LONG})
    read_tokens(client, request_id, 3)
    stopped_pid = worker_pid(daemon)
    os.kill(stopped_pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    _, terminal = collect(client.events(request_id))
    detected = time.monotonic() - stopped_at
    assert terminal["event"] == "error" and terminal["code"] == "engine_failed", terminal
    # Bound: 3 missed heartbeats of 0.3 s, the 0.25 s watch tick, the 0.5 s kill grace.
    assert detected < 0.9 + 0.25 + 0.5 + 1.0, detected
    hang = events.wait("worker.hang")
    assert "no heartbeat" in hang["reason"]
    status = daemon.wait_for(
        lambda s: s["engines"][0]["state"] == "ready" and s["engines"][0]["workers"][0]["id"] == "llama.2"
    )
    assert "hung" in status["engines"][0]["workers"][0]["last_exit"]["cause"]
    events.close()


@pytest.mark.real_engine
def test_request_sent_to_a_stopped_idle_worker_is_retried_on_its_replacement(make_daemon):
    daemon = make_daemon({"llama": LLAMA}, **FAST)
    os.kill(worker_pid(daemon), signal.SIGSTOP)
    client = daemon.client()
    tokens, done = collect(client.generate(prompt="Hello", max_tokens=6, deadline_ms=30000))
    assert done["event"] == "done", done
    assert done["worker"] == "llama.2" and tokens


@pytest.mark.real_engine
def test_corrupt_model_opens_the_circuit_traffic_fails_over_and_the_fixed_file_brings_it_back(
    make_daemon, shared_state, tmp_path
):
    good = shared_state["model"]
    model = tmp_path / "preferred.gguf"
    with open(good, "rb") as source:
        model.write_bytes(source.read(1 << 20))  # a truncated GGUF: llama.cpp refuses it
    daemon = make_daemon(
        {"preferred": {**LLAMA, "model": str(model), "priority": 10}, "backup": {**LLAMA, "priority": 20}},
        start=False,
        heartbeat_interval_s=0.3,
        supervision={
            "circuit_open_s": 2.0,
            "switch_min_dwell_s": 0.5,
            "probe_interval_s": 0,
            "restart_backoff_base_s": 0.2,
        },
    )
    daemon.start(wait_ready=False)
    events = Events(daemon)
    status = daemon.wait_for(
        lambda s: s["engines"][0]["circuit"] != "closed" and s["engines"][1]["state"] == "ready", timeout=60
    )
    preferred = status["engines"][0]
    assert preferred["name"] == "preferred" and preferred["state"] == "model_load_failed", preferred
    _, done = collect(daemon.client().generate(prompt="Hello", max_tokens=4))
    assert done["event"] == "done" and done["engine"] == "backup"
    # Fix the file; the half-open probe starts the engine and traffic returns.
    shutil.copyfile(good, tmp_path / "fixed.tmp")
    os.replace(tmp_path / "fixed.tmp", model)
    daemon.wait_for(
        lambda s: s["engines"][0]["state"] == "ready" and s["daemon"]["active_engine"] == "preferred", timeout=60
    )
    _, done = collect(daemon.client().generate(prompt="Hello", max_tokens=4))
    assert done["engine"] == "preferred"
    circuit_states = [e["state"] for e in events.of("engine.circuit") if e["engine"] == "preferred"]
    assert "half_open" in circuit_states and circuit_states[-1] == "closed"
    events.close()


def test_latency_switch_moves_traffic_without_flapping_and_returns_on_recovery(make_daemon, tmp_path):
    a, a_control = fake_engine(tmp_path, "a", 10)
    a["slo_ttft_ms"] = 150.0
    b, _ = fake_engine(tmp_path, "b", 20)
    daemon = make_daemon(
        {"a": a, "b": b},
        heartbeat_interval_s=0.3,
        supervision={
            "latency_window_s": 2.0,
            "latency_min_samples": 2,
            "switch_breach_for_s": 0.5,
            "switch_min_dwell_s": 1.0,
            "probe_interval_s": 0.2,
            "probe_timeout_s": 5.0,
        },
    )
    events = Events(daemon)
    client = daemon.client()
    daemon.wait_for(lambda s: s["daemon"]["active_engine"] == "a")
    assert collect(client.generate(prompt="x", max_tokens=2))[1]["engine"] == "a"
    a_control.write_text(json.dumps({"token_delay_s": 0.4}))
    slowed_at = time.monotonic()
    served_by: list[str] = []
    while time.monotonic() - slowed_at < 8 and (not served_by or served_by[-1] != "b"):
        served_by.append(collect(client.generate(prompt="x", max_tokens=2))[1]["engine"])
    switched = events.wait("engine.switch", lambda e: e["to"] == "b")
    assert "latency objective" in switched["reason"]
    assert served_by[-1] == "b" and time.monotonic() - slowed_at < 6
    a_control.write_text(json.dumps({"token_delay_s": 0.01}))
    recovered_at = time.monotonic()
    while time.monotonic() - recovered_at < 10 and served_by[-1] != "a":
        served_by.append(collect(client.generate(prompt="x", max_tokens=2))[1]["engine"])
        time.sleep(0.05)
    back = events.wait("engine.switch", lambda e: e["to"] == "a" and e["from"] == "b")
    assert "recovered" in back["reason"]
    # No flapping: exactly one move away and one move back.
    moves = [(e["from"], e["to"]) for e in events.of("engine.switch")]
    assert moves == [("a", "b"), ("b", "a")], moves
    events.close()


def test_chaos_every_request_gets_exactly_one_terminal_event(make_daemon, tmp_path):
    engines = {}
    for name, priority in (("a", 10), ("b", 20)):
        engine, _ = fake_engine(tmp_path, name, priority, token_delay_s=0.004)
        engines[name] = engine
    daemon = make_daemon(
        engines,
        heartbeat_interval_s=0.2,
        supervision={
            "restart_backoff_base_s": 0.05,
            "restart_backoff_cap_s": 0.3,
            "kill_grace_s": 0.2,
            "circuit_failures": 1000,
            "probe_interval_s": 0,
            "stall_timeout_s": 2.0,
        },
    )
    controls = {name: tmp_path / f"{name}.json" for name in engines}
    stop_faults = threading.Event()
    faults: list[str] = []

    def inject() -> None:
        import random

        rng = random.Random(7)
        stopped: set[int] = set()  # left alone, so that the hang detector is what ends them
        while len(faults) < 220 and time.monotonic() < give_up:
            time.sleep(0.05)
            status = daemon.status()
            live = [
                w["pid"]
                for e in status["engines"]
                for w in e["workers"]
                if w["pid"] and w["state"] in ("ready", "loading") and w["pid"] not in stopped
            ]
            kind = rng.choice(["kill", "kill", "kill", "stop", "slow"])
            if kind == "slow":
                name = rng.choice(list(controls))
                controls[name].write_text(json.dumps({"token_delay_s": rng.choice([0.002, 0.01, 0.03])}))
            elif live:
                victim = rng.choice(live)
                if kind == "stop":
                    stopped.add(victim)
                try:
                    os.kill(victim, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
                except ProcessLookupError:
                    continue  # it died on its own meanwhile
            else:
                continue
            faults.append(kind)
        stop_faults.set()

    results: list[tuple[str, float, float]] = []
    problems: list[str] = []

    def client_loop(n: int) -> None:
        client = daemon.client(timeout_s=30)
        i = 0
        # Load for as long as faults are being injected, and at least 75 requests per client.
        while i < 75 or not stop_faults.is_set():
            i += 1
            deadline_ms = 4000
            started = time.monotonic()
            try:
                tokens, terminal = collect(client.generate(prompt=f"c{n} r{i}", max_tokens=6, deadline_ms=deadline_ms))
                assert_nothing_after(client, terminal["id"])
            except Exception as exc:  # a timeout here is a request left hanging
                problems.append(f"client {n} request {i}: {exc!r}")
                return
            results.append(
                (terminal.get("code") or terminal["finish_reason"], time.monotonic() - started, deadline_ms / 1000)
            )

    give_up = time.monotonic() + 240
    injector = threading.Thread(target=inject)
    clients = [threading.Thread(target=client_loop, args=(n,)) for n in range(4)]
    injector.start()
    for thread in clients:
        thread.start()
    injector.join()
    for thread in clients:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in clients), "a client thread is still waiting for an answer"
    for control in controls.values():
        control.write_text("{}")
    assert not problems, problems[:5]
    assert len(results) >= 300, len(results)
    assert len(faults) >= 200, len(faults)
    hangs = [line for line in daemon.log_text().splitlines() if "worker hung" in line]
    assert len(hangs) >= 10, f"only {len(hangs)} stopped workers were detected as hung"
    late = [r for r in results if r[1] > r[2] + 1.0]
    assert not late, f"{len(late)} requests ended more than 1 s past their deadline: {late[:5]}"
    outcomes = {code for code, _, _ in results}
    assert outcomes <= {"length", "stop", "engine_failed", "deadline_exceeded", "no_engine_available"}, outcomes
    assert "length" in outcomes  # most requests were served despite the faults
    # Stop the daemon: no worker may be left behind.
    endpoint_marker = str(daemon.state_dir)
    daemon.stop()
    leftovers = [
        proc.pid
        for proc in __import__("psutil").process_iter(["cmdline"])
        if proc.info["cmdline"]
        and "workers" in proc.info["cmdline"]
        and any(endpoint_marker in part for part in proc.info["cmdline"])
    ]
    assert not leftovers, leftovers


def test_events_command_prints_restarts_live(make_daemon, tmp_path):
    engine, _ = fake_engine(tmp_path, "f", 10)
    daemon = make_daemon({"f": engine}, **FAST)
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisor.cli",
            "--config",
            str(daemon.config_path),
            "events",
            "--topic",
            "worker.exit",
            "--count",
            "1",
            "--timeout",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watcher.stderr.readline().startswith("watching")  # the subscription is in place
    os.kill(worker_pid(daemon, "f"), signal.SIGKILL)
    out, _ = watcher.communicate(timeout=30)
    assert "worker.exit" in out and "signal=SIGKILL" in out and "worker_id=f.1" in out


def test_worker_that_heartbeats_but_cannot_generate_is_replaced_after_a_failed_probe(make_daemon, tmp_path):
    engine, control = fake_engine(tmp_path, "f", 10)
    daemon = make_daemon(
        {"f": engine},
        heartbeat_interval_s=0.3,
        supervision={"probe_interval_s": 0.5, "probe_timeout_s": 1.0, "kill_grace_s": 0.3},
    )
    events = Events(daemon)
    events.wait("probe.result", lambda e: e["ok"] and e["worker_id"] == "f.1")
    control.write_text(json.dumps({"stuck_after_tokens": 0}))
    failed = events.wait("probe.result", lambda e: not e["ok"], timeout=10)
    assert failed["worker_id"] == "f.1" and "deadline" in failed["error"]
    # Heartbeats kept coming all along: only the probe could tell.
    assert not [e for e in events.of("worker.hang") if "heartbeat" in e["reason"]]
    control.write_text("{}")
    status = daemon.wait_for(
        lambda s: s["engines"][0]["workers"][0]["id"] == "f.2" and s["engines"][0]["state"] == "ready"
    )
    assert "liveness probe failed" in status["engines"][0]["workers"][0]["last_exit"]["cause"]
    events.close()


def test_request_on_a_stuck_worker_ends_at_the_stall_timeout_not_never(make_daemon, tmp_path):
    engine, control = fake_engine(tmp_path, "f", 10, stuck_after_tokens=2)
    daemon = make_daemon(
        {"f": engine},
        heartbeat_interval_s=0.3,
        supervision={"stall_timeout_s": 1.0, "kill_grace_s": 0.3, "probe_interval_s": 0},
    )
    client = daemon.client()
    started = time.monotonic()
    tokens, terminal = collect(client.generate(prompt="x", max_tokens=10))
    assert len(tokens) == 2 and terminal["code"] == "engine_failed", terminal
    assert time.monotonic() - started < 4.0
    assert "no token" in terminal["message"]


def test_cold_standby_starts_on_demand_after_the_gpu_engine_before_it_has_exited(make_daemon, tmp_path):
    # Both count as GPU engines (n_gpu_layers != 0); the warm one is exclusive: their memory must never overlap.
    warm, _ = fake_engine(tmp_path, "warm", 10)
    cold, _ = fake_engine(tmp_path, "cold", 20)
    warm.update(n_gpu_layers=-1, exclusive=True)
    cold.update(n_gpu_layers=-1, standby="cold")
    daemon = make_daemon(
        {"warm": warm, "cold": cold}, start=False, heartbeat_interval_s=0.3, supervision={"probe_interval_s": 0}
    )
    daemon.start(wait_ready=False)
    status = daemon.wait_for(lambda s: s["engines"][0]["state"] == "ready")
    assert status["engines"][1]["state"] == "stopped" and status["engines"][1]["workers"][0]["pid"] is None
    events = Events(daemon)
    _, done = collect(daemon.client().generate(prompt="x", max_tokens=3, engine="cold"))
    assert done["event"] == "done" and done["engine"] == "cold"
    status = daemon.status()
    assert status["engines"][0]["state"] == "stopped", "the warm GPU engine made room"
    warm_exit = events.wait("worker.exit", lambda e: e["engine"] == "warm")
    cold_spawn = events.wait("worker.state", lambda e: e["engine"] == "cold" and e["new"] == "spawning")
    assert warm_exit["intended"] and warm_exit["time"] <= cold_spawn["time"]
    assert (
        "making room on the GPU for cold"
        in [e for e in events.of("worker.state") if e["engine"] == "warm" and e["new"] == "stopping"][0]["reason"]
    )
    events.close()
