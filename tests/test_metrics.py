"""The Prometheus exposition: scraped from a real daemon's loopback port and read back
with prometheus-client's own parser; and the budget figures from the core harness."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.core.errors import Refused
from supervisor.planning.measure.gpu import GpuDevice, GpuProcess, GpuSnapshot
from supervisor.io.metrics import MetricsExporter, NodeCollector
from supervisor.planning.measure.inputs import Planning
from workers import protocol as p

from .conftest import CLI, collect, fake_engine
from .core_harness import Core
from .test_accounting import DAY_2, FAKE, paid_and_free, serve

PREFIX = "node_supervisor_"


def parse(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def scrape(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
        return parse(text)


def value(families: dict[str, Any], name: str, suffix: str = "", **labels: str) -> float:
    """The one sample of ``name`` (+ ``suffix``: _total, _count, _sum, _bucket) with exactly these labels."""
    family = families[PREFIX + name]
    (found,) = [s.value for s in family.samples if s.name == family.name + suffix and s.labels == labels]
    return found


def samples(families: dict[str, Any], name: str, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    family = families[PREFIX + name]
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == family.name + suffix}


def test_a_scrape_shows_what_the_daemon_did(make_daemon, tmp_path):
    engine, control = fake_engine(tmp_path)
    engine.update(price_input_per_mtok=1000.0, price_output_per_mtok=2000.0)
    daemon = make_daemon({"f": engine}, metrics={"listen": "127.0.0.1:0"}, supervision={"probe_interval_s": 0})
    url = daemon.status()["daemon"]["metrics_url"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    client = daemon.client()
    ends = [collect(client.generate(prompt="one two three", max_tokens=5))]

    # One request generating, one waiting behind it: then both cancelled.
    control.write_text(json.dumps({"token_delay_s": 0.2}))
    slow_id = client.send({"op": "generate", "prompt": "hi", "max_tokens": 200})
    first = client.receive(slow_id)
    queued_id = client.send({"op": "generate", "prompt": "hi", "max_tokens": 5})
    daemon.wait_for(lambda s: s["engines"][0]["queue_depth"] == 1)
    busy = scrape(url)
    assert value(busy, "num_requests_running", engine="f") == 1 and value(busy, "num_requests_waiting", engine="f") == 1
    client.cancel(queued_id)
    ends.append(collect(client.events(queued_id)))
    client.cancel(slow_id)
    tokens, end = collect(client.events(slow_id))
    ends.append(([first, *tokens], end))

    ends.append(collect(client.generate(prompt="hi", max_tokens=50, deadline_ms=300)))
    control.write_text(json.dumps({"token_delay_s": 0.01, "crash_after_tokens": 3}))
    ends.append(collect(client.generate(prompt="hi", max_tokens=50)))
    control.write_text(json.dumps({"token_delay_s": 0.01}))
    _, refused = collect(client.generate(prompt="hi", engine="no-such-engine"))
    status = daemon.wait_for(
        lambda s: s["engines"][0]["state"] == "ready" and s["engines"][0]["workers"][0]["restarts"] == 1
    )

    terminals = [end for _, end in ends]
    assert [e.get("finish_reason") or e["code"] for e in terminals] == [
        "length",
        "cancelled",
        "cancelled",
        "deadline_exceeded",
        "engine_failed",
    ]
    assert refused["code"] == p.ErrorCode.UNKNOWN_ENGINE
    families = scrape(url)
    types = {name[len(PREFIX) :]: family.type for name, family in families.items() if name.startswith(PREFIX)}
    assert types == {
        "num_requests_running": "gauge",
        "num_requests_waiting": "gauge",
        "request_success": "counter",
        "request_errors": "counter",
        "requests_refused": "counter",
        "time_to_first_token_seconds": "histogram",
        "inter_token_latency_seconds": "histogram",
        "e2e_request_latency_seconds": "histogram",
        "request_queue_time_seconds": "histogram",
        "prompt_tokens": "counter",
        "generation_tokens": "counter",
        "cost": "counter",
        "prompt_tokens_today": "gauge",
        "generation_tokens_today": "gauge",
        "cost_today": "gauge",
        "budget_exhausted": "gauge",
        "daily_budget": "gauge",
        "worker_restarts": "counter",
        "circuit_state": "gauge",
        "engine_up": "gauge",
        "engine_ready": "gauge",
        "engine_info": "gauge",
        "models_loaded": "gauge",
        "model_loads": "counter",
        "model_unloads": "counter",
        "model_load_seconds": "histogram",
        "worker_gpu_memory_bytes": "gauge",
    }

    # How each request ended, by finish reason and by error code.
    finished = Counter(e["finish_reason"] for e in terminals if e["event"] == "done")
    for reason in (p.FINISH_STOP, p.FINISH_LENGTH, p.FINISH_CANCELLED):
        assert value(families, "request_success", "_total", engine="f", finished_reason=reason) == finished[reason]
    errors = Counter(e["code"] for e in terminals if e["event"] == "error")
    assert samples(families, "request_errors", "_total") == {
        (("code", code), ("engine", "f")): n for code, n in errors.items()
    }
    assert samples(families, "requests_refused", "_total") == {
        (("code", p.ErrorCode.UNKNOWN_ENGINE), ("engine", "")): 1
    }

    # Tokens: generated ones as streamed (one per token event here), prompt ones as the worker counted them.
    streamed = [len(tokens) for tokens, _ in ends]
    prompt = sum((e.get("usage") or {}).get("prompt_tokens") or 0 for e in terminals)
    assert (
        value(families, "generation_tokens", "_total", engine="f")
        == sum(streamed)
        == value(families, "generation_tokens_today", engine="f")
    )
    assert (
        value(families, "prompt_tokens", "_total", engine="f")
        == prompt
        == value(families, "prompt_tokens_today", engine="f")
    )
    assert value(families, "cost", "_total", engine="f") == pytest.approx(
        (prompt * 1000.0 + sum(streamed) * 2000.0) / 1e6
    )
    assert samples(families, "daily_budget") == {} and value(families, "budget_exhausted", engine="f") == 0

    # Histograms: one observation per request end, per first token, per later token.
    assert value(families, "e2e_request_latency_seconds", "_count", engine="f") == len(ends)
    assert value(families, "e2e_request_latency_seconds", "_bucket", engine="f", le="+Inf") == len(ends)
    assert value(families, "time_to_first_token_seconds", "_count", engine="f") == sum(1 for n in streamed if n)
    assert value(families, "inter_token_latency_seconds", "_count", engine="f") == sum(n - 1 for n in streamed if n)
    assert (
        value(families, "request_queue_time_seconds", "_count", engine="f") == len(ends) - 1
    )  # the cancelled waiter never ran

    restarts = {
        cause: value(families, "worker_restarts", "_total", engine="f", cause=cause)
        for cause in ("crash", "hang", "probe_failure", "oom", "load_failure")
    }
    assert restarts == {"crash": 1, "hang": 0, "probe_failure": 0, "oom": 0, "load_failure": 0}
    assert (
        value(families, "num_requests_running", engine="f") == 0
        and value(families, "num_requests_waiting", engine="f") == 0
    )
    assert {
        state: value(families, "circuit_state", engine="f", state=state) for state in ("closed", "open", "half_open")
    } == {"closed": 1, "open": 0, "half_open": 0}
    assert value(families, "engine_info", engine="f", kind="fake", model=status["engines"][0]["model"]) == 1
    worker = status["engines"][0]["workers"][0]
    gpu = (
        {}
        if worker["gpu_memory_bytes"] is None
        else {(("engine", "f"), ("worker", worker["id"])): worker["gpu_memory_bytes"]}
    )
    assert samples(families, "worker_gpu_memory_bytes") == gpu  # none without a GPU probe's devices
    assert "process_resident_memory_bytes" in families or "process_cpu_seconds" in families  # the standard collectors

    # The same figures in `node-supervisor status`.
    shown = subprocess.run(
        [*CLI, "--config", str(daemon.config_path), "status"], capture_output=True, text=True, timeout=30
    )
    assert f"metrics: {url}" in shown.stdout
    assert (
        f"tokens prompt/generated {prompt}/{sum(streamed)}, today {prompt}/{sum(streamed)}  cost today " in shown.stdout
    )


def test_the_metrics_port_answers_only_get_on_its_path(make_daemon, tmp_path):
    engine, _ = fake_engine(tmp_path)
    daemon = make_daemon({"f": engine}, metrics={"listen": "127.0.0.1:0"})
    url = daemon.status()["daemon"]["metrics_url"]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=10)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=10)
    assert posted.value.code == 405
    openmetrics = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(openmetrics, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.read().decode().rstrip().endswith("# EOF")
    host, port = url.split("/")[2].split(":")
    # A line past the 16 KiB limit is still read whole by the transport, so the answer is not lost to a reset.
    for garbage in (b"hello\r\n\r\n", b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 20_000 + b"\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(garbage)
            assert raw.recv(4096).startswith(b"HTTP/1.1 400 ")
    assert daemon.engine("f")["state"] == "ready"  # none of it hurt the daemon


def test_without_a_listen_address_no_port_is_opened(make_daemon, tmp_path):
    engine, _ = fake_engine(tmp_path)
    daemon = make_daemon({"f": engine})
    assert daemon.status()["daemon"]["metrics_url"] is None


def test_budget_and_cost_figures_in_the_exposition():
    core = paid_and_free()
    serve(core, "paid", "r1", 5)  # five of five spent
    with pytest.raises(Refused):
        core.submit("pinned", engine="paid")
    body, content_type = MetricsExporter(NodeCollector(core.engines)).render()
    assert content_type.startswith("text/plain")
    families = parse(body.decode())
    assert (
        value(families, "budget_exhausted", engine="paid") == 1
        and value(families, "budget_exhausted", engine="free") == 0
    )
    assert samples(families, "daily_budget") == {(("engine", "paid"),): 5.0}
    assert value(families, "cost_today", engine="paid") == 5.0 == value(families, "cost", "_total", engine="paid")
    assert value(families, "requests_refused", "_total", engine="paid", code=p.ErrorCode.BUDGET_EXHAUSTED) == 1
    assert "node_supervisor_worker_gpu_memory_bytes" not in families  # no GPU probe given
    core.advance(31, day=DAY_2)
    families = parse(MetricsExporter(NodeCollector(core.engines)).render()[0].decode())
    assert value(families, "budget_exhausted", engine="paid") == 0 and value(families, "cost_today", engine="paid") == 0
    assert value(families, "cost", "_total", engine="paid") == 5.0  # since start: kept


def test_a_metrics_port_in_use_stops_the_daemon_with_78_before_any_worker_starts(make_daemon, tmp_path):
    engine, _ = fake_engine(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = make_daemon({"f": engine}, start=False, metrics={"listen": f"127.0.0.1:{port}"})
        daemon.start(wait_ready=False)
        assert daemon.process is not None
        assert daemon.process.wait(timeout=60) == 78
    output = daemon.log_text()
    assert f"cannot listen for metrics on 127.0.0.1:{port}" in output and "Traceback" not in output
    assert "spawning" not in output


def test_gpu_memory_per_worker_comes_from_the_probe():
    """What NVML says each live worker's process holds, summed over devices (0 for one it does not list); no series without a device."""
    core = Core({"a": FAKE, "b": {**FAKE, "priority": 2}})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.bring_up("b")
    device = GpuDevice(
        index=0,
        name="GPU",
        uuid="GPU-0",
        total_bytes=80 << 30,
        free_bytes=70 << 30,
        used_bytes=10 << 30,
        processes=(GpuProcess(pid=111, used_bytes=6 << 30), GpuProcess(pid=999, used_bytes=4 << 30)),
    )
    second = GpuDevice(
        index=1,
        name="GPU",
        uuid="GPU-1",
        total_bytes=80 << 30,
        free_bytes=79 << 30,
        used_bytes=1 << 30,
        processes=(GpuProcess(pid=111, used_bytes=1 << 30),),
    )
    planning = Planning(core.settings, lambda: GpuSnapshot((device, second), "580.00", "13.0", ""))
    processes: dict[str, Any] = {"a.1": SimpleNamespace(pid=111), "b.1": SimpleNamespace(pid=222)}
    families = parse(MetricsExporter(NodeCollector(core.engines, planning, processes)).render()[0].decode())
    assert samples(families, "worker_gpu_memory_bytes") == {
        (("engine", "a"), ("worker", "a.1")): 7 << 30,
        (("engine", "b"), ("worker", "b.1")): 0,
    }
    no_gpu = Planning(core.settings, lambda: GpuSnapshot((), None, None, "no NVIDIA driver"))
    families = parse(MetricsExporter(NodeCollector(core.engines, no_gpu, processes)).render()[0].decode())
    assert samples(families, "worker_gpu_memory_bytes") == {}


def test_models_loaded_loads_and_unloads_by_reason_and_the_load_time():
    core = Core({"a": {"kind": "fake", "standby": "cold", "keep_alive": 5}}, supervision={"probe_interval_s": 0})
    core.submit("r1", engine="a")
    core.advance(2)  # the load takes 2 s
    core.bring_up("a")
    core.finish_current("a")
    families = parse(MetricsExporter(NodeCollector(core.engines)).render()[0].decode())
    assert value(families, "models_loaded") == 1
    assert value(families, "model_loads", "_total", engine="a", reason="demand") == 1
    assert value(families, "model_load_seconds", "_count", engine="a") == 1
    assert value(families, "model_load_seconds", "_sum", engine="a") == 2.0
    assert value(families, "model_load_seconds", "_bucket", engine="a", le="1.0") == 0
    core.advance(5)  # keep_alive
    core.exit("a", 0)
    families = parse(MetricsExporter(NodeCollector(core.engines)).render()[0].decode())
    assert value(families, "models_loaded") == 0
    assert value(families, "model_unloads", "_total", engine="a", reason="idle") == 1
