"""Honest signals: per-engine up/ready gauges and circuit states that match availability, `status`
exiting non-zero when no engine can serve, no warning on a clean start, no socket left by a clean stop."""

from __future__ import annotations

import json
import signal
import subprocess

from .conftest import CLI
from .test_metrics import scrape, value

FAKE = {"kind": "fake", "priority": 10}
UNAVAILABLE = {"kind": "fake", "priority": 20, "options": {"fail_load": "unavailable"}}
MISSING = {"kind": "llamacpp", "priority": 30, "model": "/nonexistent/missing.gguf"}


def status_command(daemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--config", str(daemon.config_path), "status"], capture_output=True, text=True, timeout=30
    )


def test_engines_that_cannot_serve_are_down_in_metrics_with_their_circuit_open(make_daemon):
    daemon = make_daemon({"f": FAKE, "unavailable": UNAVAILABLE, "missing": MISSING}, metrics={"listen": "127.0.0.1:0"})
    daemon.wait_for(lambda s: {e["name"]: e["state"] for e in s["engines"]}["unavailable"] == "engine_unavailable")
    families = scrape(daemon.status()["daemon"]["metrics_url"])
    assert value(families, "engine_up", engine="f") == 1 and value(families, "engine_ready", engine="f") == 1
    for down in ("unavailable", "missing"):
        assert value(families, "engine_up", engine=down) == 0 and value(families, "engine_ready", engine=down) == 0
        assert value(families, "circuit_state", engine=down, state="open") == 1, down
        assert value(families, "circuit_state", engine=down, state="closed") == 0, down
    assert value(families, "circuit_state", engine="f", state="closed") == 1
    assert {e["name"]: e["circuit"] for e in daemon.status()["engines"]}["unavailable"] == "open"


def test_status_exits_non_zero_when_no_engine_can_serve(make_daemon):
    serving = make_daemon({"f": FAKE})
    assert status_command(serving).returncode == 0
    idle = make_daemon({"unavailable": UNAVAILABLE})
    idle.wait_for(lambda s: s["engines"][0]["state"] == "engine_unavailable")
    result = status_command(idle)
    assert result.returncode == 3 and "no engine can serve" in result.stdout, result
    assert idle.status()["daemon"]["serving"] is False


def test_a_clean_start_logs_no_warning_and_a_clean_stop_leaves_no_socket(make_daemon):
    daemon = make_daemon({"f": FAKE})
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=30) == 0
    assert [p.name for p in (daemon.state_dir / "run").iterdir() if p.is_socket()] == []
    daemon.start()  # again, on the same state directory
    records = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    assert [r for r in records if r["level"] in ("warning", "error")] == []
    assert not any(r["event"] == "removed a stale socket file" for r in records)
    assert any(r["event"] == "traffic goes to" and r["engine"] == "f" for r in records)
