"""Worker failures, with the fake engine in a real worker process."""

from __future__ import annotations

import json

from .conftest import collect, fake_engine


def fake(tmp_path, priority=10, **options):
    return fake_engine(tmp_path, f"control-{priority}", priority, **options)


def test_crash_mid_stream_gives_engine_failed_then_the_worker_is_restarted(make_daemon, tmp_path):
    engine, control = fake(tmp_path, crash_after_tokens=3)
    daemon = make_daemon({"f": engine})
    client = daemon.client()
    tokens, terminal = collect(client.generate(prompt="hi", max_tokens=50))
    # The third token may die with the process before it leaves; what arrived is what counts.
    assert 1 <= len(tokens) <= 3
    assert terminal["event"] == "error" and terminal["code"] == "engine_failed", terminal
    assert terminal["usage"]["completion_tokens"] == len(tokens)
    assert "exited with code 1" in terminal["message"]
    control.write_text(json.dumps({"crash_after_tokens": None}))
    status = daemon.wait_for(
        lambda s: s["engines"][0]["state"] == "ready" and s["engines"][0]["workers"][0]["restarts"] == 1
    )
    worker = status["engines"][0]["workers"][0]
    assert worker["last_exit"]["exit_code"] == 1 and worker["last_exit"]["cause"] == "exited with code 1"
    _, done = collect(client.generate(prompt="hi", max_tokens=5))
    assert done["event"] == "done" and done["worker"] == "f.2"


def test_request_without_tokens_is_retried_once_on_the_restarted_worker(make_daemon, tmp_path):
    engine, control = fake(tmp_path, crash_after_tokens=0)
    daemon = make_daemon({"f": engine})
    client = daemon.client()
    request_id = client.send({"op": "generate", "prompt": "hi", "max_tokens": 5})
    daemon.wait_for(lambda s: s["engines"][0]["workers"][0]["restarts"] == 1)
    control.write_text(json.dumps({"crash_after_tokens": None}))
    tokens, done = collect(client.events(request_id))
    assert done["event"] == "done", done
    assert len(tokens) == 5 and done["worker"] == "f.2"


def test_unavailable_engine_is_not_restarted_and_traffic_goes_to_the_next(make_daemon, tmp_path):
    broken, _ = fake(tmp_path, priority=10, fail_load="unavailable")
    good, _ = fake(tmp_path, priority=20)
    daemon = make_daemon({"first": broken, "second": good})
    status = daemon.wait_for(lambda s: s["engines"][0]["state"] == "engine_unavailable")
    first = status["engines"][0]
    assert "fake: engine unavailable" in first["reason"]
    assert first["workers"][0]["restarts"] == 0 and first["workers"][0]["last_exit"]["exit_code"] == 69
    _, done = collect(daemon.client().generate(prompt="hi", max_tokens=3))
    assert done["event"] == "done" and done["engine"] == "second"
    _, pinned = collect(daemon.client().generate(prompt="hi", max_tokens=3, engine="first"))
    assert pinned["code"] == "engine_unavailable"
    assert daemon.engine("first")["workers"][0]["restarts"] == 0  # started once, never again


def test_tokens_are_counted_not_token_events(make_daemon, tmp_path):
    """An engine that sends several tokens per event: usage, the request-end log and the per-token latency count tokens."""
    engine, _ = fake(tmp_path, tokens_per_event=4, token_delay_s=0.01)
    daemon = make_daemon({"f": engine})
    client = daemon.client()
    for _ in range(3):
        tokens, done = collect(client.generate(prompt="hi", max_tokens=40))
        assert len(tokens) == 10 and done["usage"]["completion_tokens"] == 40, (len(tokens), done)
    latency = daemon.engine("f")["latency"]["per_token_ms"]
    # 10 ms a token; counting events would make it 40 ms (sleeps only ever run long, so the bound is one-sided).
    assert latency["samples"] == 3 and 9.0 <= latency["p50"] < 25.0, latency
    ends = [line for line in daemon.log_text().splitlines() if '"request end"' in line]
    assert len(ends) == 3 and all('"tokens": 40' in line for line in ends), ends
