"""Many models on one node, end to end: a real daemon with fake engines on a recorded GPU
(NODESUP_TEST_GPU: NVML's answers from a file; no test pretends a real GPU exists), and
the real llama.cpp worker on this CPU with the default model under two names."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from workers import protocol as p

from .conftest import CLI, collect, fake_engine, wait_until
from .test_http import base_url, http_settings
from .test_supervision import Events

MIB = 1 << 20


def started(daemon):
    """Models loaded on demand are not loaded at start: the daemon is up once it answers."""
    daemon.start(wait_ready=False)
    daemon.wait_for(lambda status: True)
    return daemon


def model_state(daemon, name: str) -> dict[str, Any]:
    with daemon.client() as client:
        return next(m for m in client.ps()["models"] if m["engine"] == name)


def generate(daemon, engine: str, **fields: Any) -> dict[str, Any]:
    with daemon.client(timeout_s=60) as client:
        _, end = collect(client.generate(prompt="hi", engine=engine, max_tokens=3, **fields))
    return end


def cli(daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--config", str(daemon.config_path), *args], capture_output=True, text=True, timeout=120
    )


def post(daemon, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        base_url(daemon) + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def recorded_gpu(tmp_path, monkeypatch) -> Path:
    """A 10000 MiB card on which engines a, b, c each hold 4000 MiB once their worker runs."""
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"devices": [{"total_mib": 10_000}], "engines": {"a": 4000, "b": 4000, "c": 4000}}))
    monkeypatch.setenv("NODESUP_TEST_GPU", str(path))
    return path


def test_fake_engines_on_a_recorded_gpu_load_side_by_side_evict_the_least_recently_used_and_unload_when_idle(
    make_daemon, tmp_path, recorded_gpu
):
    engines = {}
    for name in "abc":
        config, _ = fake_engine(tmp_path, name)
        engines[name] = {**config, "standby": "cold", "n_gpu_layers": -1, "gpu_mib": 4000}
    daemon = started(make_daemon(engines, False, gpu={"min_residency_s": 0}, supervision={"probe_interval_s": 0}))
    events = Events(daemon)
    try:
        assert generate(daemon, "a")["event"] == "done"
        assert generate(daemon, "b")["event"] == "done"
        # ps shows NVML's figure at most a second old (STATUS_SNAPSHOT_AGE_S): the worker's pid appears in it.
        wait_until(lambda: model_state(daemon, "a")["gpu_bytes_measured"] == 4000 * MIB, 10, "a measured")
        assert model_state(daemon, "a")["state"] == model_state(daemon, "b")["state"] == "ready"
        ps = cli(daemon, "ps")
        assert ps.returncode == 0 and "GPU 0" in ps.stdout and "4000" in ps.stdout, ps.stdout
        # c does not fit beside a and b: a, the least recently used, is evicted; c's request is served.
        end = generate(daemon, "c")
        assert end["event"] == "done" and end["timings"]["load_ms"] is not None
        evicted = events.wait("engine.unload", lambda e: e["reason"] == "evicted")
        assert evicted["engine"] == "a"
        assert model_state(daemon, "a")["state"] == "stopped" and model_state(daemon, "b")["state"] == "ready"
        assert daemon.engine("a")["workers"][0]["restarts"] == 0 and daemon.engine("a")["circuit"] == "closed"
        # keep_alive 0 on a request: c goes right after it, as a planned stop.
        assert generate(daemon, "c", keep_alive=0)["event"] == "done"
        events.wait("engine.unload", lambda e: e["engine"] == "c" and e["reason"] == "idle")
        wait_until(lambda: model_state(daemon, "c")["state"] == "stopped", 10, "c unloaded")
        # unload --all through the CLI, load through the CLI with a keep_alive of 1 s.
        unload = cli(daemon, "unload", "--all")
        assert unload.returncode == 0 and "b" in unload.stdout, unload.stderr
        wait_until(lambda: model_state(daemon, "b")["state"] == "stopped", 10, "b unloaded")
        load = cli(daemon, "load", "a", "--keep-alive", "1")
        assert load.returncode == 0 and "a: ready" in load.stdout, (load.stdout, load.stderr)
        events.wait("engine.unload", lambda e: e["engine"] == "a" and e["reason"] == "idle", timeout=10)
    finally:
        events.close()


def test_a_model_too_big_for_either_of_two_recorded_gpus_is_split_and_measured_on_both(
    make_daemon, tmp_path, recorded_gpu
):
    recorded_gpu.write_text(
        json.dumps({"devices": [{"total_mib": 8000}, {"total_mib": 8000}], "engines": {"big": 12_000}})
    )
    config, _ = fake_engine(tmp_path, "big")
    engines = {"big": {**config, "standby": "cold", "n_gpu_layers": -1, "gpu_mib": 12_000}}
    daemon = started(make_daemon(engines, False, supervision={"probe_interval_s": 0}))
    events = Events(daemon)
    try:
        assert generate(daemon, "big")["event"] == "done"
        load = events.wait("engine.load", lambda e: e["engine"] == "big")
        # 12000 MiB and one more CUDA context (600 MiB), in proportion to two equal devices.
        assert (load["devices"], load["device_mib"]) == ([0, 1], [6300, 6300])
        # NVML's figures for the worker's pid on both devices, summed for the model.
        wait_until(lambda: model_state(daemon, "big")["gpu_bytes_measured"] == 12_000 * MIB, 10, "big measured")
        ps = cli(daemon, "ps")
        assert ps.returncode == 0 and "GPU 0+1" in ps.stdout and "6300+6300" in ps.stdout, ps.stdout
    finally:
        events.close()


def test_insufficient_memory_and_bad_input_are_clear_errors(make_daemon, tmp_path, recorded_gpu):
    recorded_gpu.write_text(json.dumps({"devices": [{"total_mib": 10_000, "neighbours_mib": 8000}], "engines": {}}))
    config, _ = fake_engine(tmp_path, "a")
    engines = {"a": {**config, "standby": "cold", "n_gpu_layers": -1, "gpu_mib": 4000, "on_no_room": "fail"}}
    daemon = started(make_daemon(engines, False, supervision={"probe_interval_s": 0}, **http_settings()))
    end = generate(daemon, "a")
    assert end["code"] == p.ErrorCode.INSUFFICIENT_MEMORY and "needs 4000 MiB, 2000 MiB free" in end["message"]
    status, body = post(daemon, "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 503 and body["error"]["code"] == "insufficient_memory" and body["error"]["type"] == "server_error"
    with daemon.client() as client:
        refused = client.receive(client.send({"op": p.OP_GENERATE, "prompt": "x", "engine": "a", "keep_alive": [1]}))
        assert refused["code"] == p.ErrorCode.INVALID_REQUEST and refused["message"].startswith("keep_alive:")
        unknown = client.load("nosuch")
        assert unknown["code"] == p.ErrorCode.UNKNOWN_ENGINE and "nosuch" in unknown["message"]
        both = client.receive(client.send({"op": p.OP_UNLOAD, "engine": "a", "all": True}))
        assert both["code"] == p.ErrorCode.INVALID_REQUEST and both["message"].startswith("engine:")
    assert cli(daemon, "load", "nosuch").returncode == 1


# --- the real llama.cpp worker on this CPU --------------------------------------------------------------


@pytest.mark.real_engine
def test_two_names_of_the_default_model_load_on_demand_and_unload_after_keep_alive(make_daemon, shared_state, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("first", "second"):
        (models / f"{name}.gguf").symlink_to(shared_state["model"])
    (models / "garbage.gguf").write_bytes(b"not a model at all")
    settings = {
        "models_dir": [str(models)],
        "supervision": {"probe_interval_s": 0},
        **http_settings(),
    }
    engine = {"keep_alive": 120, "n_ctx": 512, "n_threads": 2}
    daemon = started(make_daemon({"first": engine, "second": engine}, False, **settings))
    listed = cli(daemon, "models")
    assert listed.returncode == 0 and "first" in listed.stdout and "available" in listed.stdout, listed.stdout
    assert "garbage.gguf: not a GGUF file" in listed.stdout
    assert generate(daemon, "first")["event"] == "done"
    assert generate(daemon, "second")["event"] == "done"
    first, second = model_state(daemon, "first"), model_state(daemon, "second")
    assert first["state"] == second["state"] == "ready"
    pids = [first["pid"], second["pid"]]
    rss = [first["rss_bytes"], second["rss_bytes"]]
    assert all(r and r > 50 * MIB for r in rss), rss  # each worker holds its own copy of the weights
    ps = cli(daemon, "ps")
    assert "first" in ps.stdout and "second" in ps.stdout, ps.stdout
    # keep_alive 2 s from now (the load command on a loaded model): both go, and their memory is returned.
    for name in ("first", "second"):
        load = cli(daemon, "load", name, "--keep-alive", "2s")
        assert load.returncode == 0 and f"{name}: ready" in load.stdout, (load.stdout, load.stderr)
    try:
        wait_until(
            lambda: all(model_state(daemon, n)["state"] == "stopped" for n in ("first", "second")), 20, "both unloaded"
        )
    except BaseException:
        print([model_state(daemon, n) for n in ("first", "second")], daemon.log_tail(60))
        raise
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), 10, "workers exited: their memory returned")
    # load and unload through the HTTP front, with llama-server's bodies.
    status, body = post(daemon, "/models/load", {"model": "first"})
    assert status == 200 and body["success"] is True
    wait_until(lambda: model_state(daemon, "first")["state"] == "ready", 60, "first loaded over HTTP")
    with urllib.request.urlopen(base_url(daemon) + "/v1/models", timeout=10) as response:
        listed = {m["id"]: m["status"]["value"] for m in json.loads(response.read())["data"]}
    assert listed["first"] == "loaded" and listed["second"] == "unloaded"
    status, body = post(daemon, "/models/unload", {"model": "first"})
    assert status == 200 and body["success"] is True
    wait_until(lambda: model_state(daemon, "first")["state"] == "stopped", 20, "first unloaded over HTTP")
    status, body = post(daemon, "/models/load", {"model": "nosuch"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = post(daemon, "/models/load", {"model": "first", "keep_alive": True})
    assert status == 400 and body["error"]["param"] == "keep_alive"


def test_a_reload_picks_up_model_files_added_and_removed_and_lists_bad_ones(make_daemon, shared_state, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "first.gguf").symlink_to(shared_state["model"])
    fake, _ = fake_engine(tmp_path, "f")
    directories = [str(models), str(tmp_path / "not-there")]
    daemon = started(make_daemon({"f": fake}, False, models_dir=directories))
    listed = cli(daemon, "models")
    assert "first" in listed.stdout and f"warning: models_dir {tmp_path / 'not-there'}: not found" in listed.stdout
    (models / "second.gguf").symlink_to(shared_state["model"])
    (models / "half.gguf").write_bytes(b"GGUF\x03\x00")
    (models / "first.gguf").unlink()
    reload = cli(daemon, "reload", "--json")
    assert reload.returncode == 0, reload.stderr
    changes = json.loads(reload.stdout)
    assert changes["added"] == ["second"] and changes["removed"] == ["first"], changes
    with daemon.client() as client:
        ps = client.ps()
    assert [m["engine"] for m in ps["models"]] == ["f", "second"]
    assert [(u["name"], u["reason"].split(":")[0]) for u in ps["unavailable"]] == [("half", "truncated")]
    assert "model file cannot be served" in daemon.log_text()
