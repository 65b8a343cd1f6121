"""The remote engine (kind "openai") against a real upstream started by the test: another
daemon's OpenAI-compatible HTTP front, on fake engines (fast, deterministic words) and,
in one test, on llama.cpp with the default model.

The daemon under test (the "front") has the remote engine first and a local fake
engine, `degrade`, after it: the chain local → remote → degrade is configuration.
"""

from __future__ import annotations

import email.utils
import json
import os
import signal
import time
from typing import Any

import pytest

from supervisor.cli.output import format_status
from supervisor.config import ConfigError, load_settings
from supervisor.core.reload import LOAD_FIELDS
from workers.remote.http import retry_after

from .conftest import LLAMA, Daemon, collect, wait_until
from .test_http import base_url, fake_words, free_port, request_end

UPSTREAM_KEY = "sk-upstream-3b9e71c04d2a58f6"
WRONG_KEY = "sk-wrong-0c7d1f2e9a8b6453"
DEGRADE = {"kind": "fake", "priority": 20, "options": {"token_delay_s": 0.005}}
# Fast restarts, a breaker that opens after two failures and probes soon, traffic that returns at once.
FAST_SUPERVISION = {
    "restart_backoff_base_s": 0.2,
    "restart_backoff_cap_s": 0.5,
    "circuit_failures": 2,
    "circuit_open_s": 2.0,
    "switch_min_dwell_s": 0,
    "probe_interval_s": 0,
}


def start_upstream(
    make_daemon: Any,
    engines: dict[str, dict[str, Any]],
    port: int | None = None,
    http: dict[str, Any] | None = None,
    **settings: Any,
) -> Daemon:
    """Another daemon serving its engines on an HTTP front (the remote engine's upstream)."""
    return make_daemon(engines, http={"listen": f"127.0.0.1:{port or free_port()}", **(http or {})}, **settings)


def remote_engine(upstream: Daemon, priority: int = 10, **fields: Any) -> dict[str, Any]:
    return {
        "kind": "openai",
        "priority": priority,
        "upstream": {"base_url": base_url(upstream) + "/v1", "model": "f", **fields},
    }


def served_by(event: dict[str, Any]) -> str:
    assert event["event"] == "done", event
    return event["engine"]


# --- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_fields", [{"prompt": "one two three"}, {"messages": [{"role": "user", "content": "hi there"}]}]
)
def test_tokens_pass_through_one_by_one_with_the_upstream_usage(make_daemon, request_fields):
    upstream = start_upstream(make_daemon, {"f": {"kind": "fake", "options": {"token_delay_s": 0.01}}})
    front = make_daemon({"remote": remote_engine(upstream), "degrade": DEGRADE}, supervision=FAST_SUPERVISION)
    tokens, done = collect(front.client().generate(max_tokens=7, stream=True, **request_fields))
    direct_tokens, direct = collect(upstream.client().generate(max_tokens=7, stream=True, **request_fields))
    assert served_by(done) == "remote"
    assert len(tokens) == len(direct_tokens) == 7  # one event per upstream chunk, none merged or split
    assert "".join(t["text"] for t in tokens) == fake_words(7)
    assert done["usage"] == direct["usage"] and done["finish_reason"] == direct["finish_reason"] == "length"
    assert front.engine("remote")["workers"][0]["model"]["model_name"] == "f"


def test_a_cancel_closes_the_upstream_stream_and_the_upstream_stops_generating(make_daemon):
    upstream = start_upstream(make_daemon, {"f": {"kind": "fake", "options": {"token_delay_s": 0.02}}})
    front = make_daemon({"remote": remote_engine(upstream), "degrade": DEGRADE}, supervision=FAST_SUPERVISION)
    client = front.client()
    events = client.generate(prompt="x", max_tokens=5000, stream=True)
    first = next(events)
    client.cancel(first["id"])
    _, done = collect(events)
    assert done["event"] == "done" and done["finish_reason"] == "cancelled" and done["engine"] == "remote"
    ends = lambda: [json.loads(line) for line in upstream.log_text().splitlines() if '"request end"' in line]  # noqa: E731
    (upstream_end,) = wait_until(ends, 10, "the upstream ended its request")
    assert upstream_end["finish_reason"] == "cancelled" and upstream_end["tokens"] < 5000  # it saw its client leave
    assert (
        served_by(client.complete("x", max_tokens=3)) == "remote"
        and front.engine("remote")["workers"][0]["restarts"] == 0
    )


def test_a_request_the_upstream_refuses_is_that_requests_error_and_the_engine_serves_on(make_daemon):
    upstream = start_upstream(make_daemon, {"f": {"kind": "fake"}}, max_tokens_limit=8)
    front = make_daemon({"remote": remote_engine(upstream), "degrade": DEGRADE}, supervision=FAST_SUPERVISION)
    client = front.client()
    refused = client.complete("x", max_tokens=20)  # valid here, over the upstream's max_tokens_limit: its 400
    assert refused["event"] == "error" and refused["code"] == "invalid_request" and "400" in refused["message"], refused
    assert served_by(client.complete("x", max_tokens=8)) == "remote"
    remote = front.engine("remote")
    assert remote["circuit"] == "closed" and remote["workers"][0]["restarts"] == 0


# --- failures ------------------------------------------------------------------------------


def test_an_upstream_dying_mid_stream_is_a_crash_and_the_circuit_closes_when_it_is_back(make_daemon):
    port = free_port()
    slow = {"f": {"kind": "fake", "options": {"token_delay_s": 0.05}}}
    upstream = start_upstream(make_daemon, slow, port)
    front = make_daemon({"remote": remote_engine(upstream), "degrade": DEGRADE}, supervision=FAST_SUPERVISION)
    client = front.client()
    events = client.generate(prompt="x", max_tokens=1000, stream=True)
    streamed = [next(events) for _ in range(3)]
    upstream.status()  # its workers' pids, for the teardown: they outlive their killed daemon for a few heartbeats
    os.kill(upstream.process.pid, signal.SIGKILL)
    more, failed = collect(events)
    assert failed["event"] == "error" and failed["code"] == "engine_failed", failed
    assert failed["usage"]["completion_tokens"] == len(streamed + more) >= 3
    assert "".join(e["text"] for e in streamed + more) == fake_words(len(streamed + more))
    # The worker exits as a crash and restarts; its load finds nobody at the upstream's address: the circuit opens.
    status = front.wait_for(lambda s: next(e for e in s["engines"] if e["name"] == "remote")["circuit"] == "open")
    remote = next(e for e in status["engines"] if e["name"] == "remote")
    assert remote["state"] == "engine_failed" and remote["workers"][0]["restarts"] >= 2, remote
    assert remote["workers"][0]["last_exit"]["exit_code"] == 1  # a crash, not "unavailable" (69: never restarted)
    assert served_by(client.complete("x", max_tokens=3)) == "degrade"
    start_upstream(make_daemon, slow, port)  # back, at the same address
    front.wait_for(lambda s: next(e for e in s["engines"] if e["name"] == "remote")["state"] == "ready", timeout=30)
    assert front.engine("remote")["circuit"] == "closed"
    assert served_by(client.complete("x", max_tokens=3)) == "remote"


def test_an_upstream_restarted_between_requests_is_reached_on_a_new_connection_without_a_crash(make_daemon):
    port = free_port()
    upstream = start_upstream(make_daemon, {"f": {"kind": "fake"}}, port)
    front = make_daemon({"remote": remote_engine(upstream), "degrade": DEGRADE}, supervision=FAST_SUPERVISION)
    client = front.client()
    assert served_by(client.complete("x", max_tokens=3)) == "remote"  # its connection is kept for the next request
    upstream.stop()
    start_upstream(make_daemon, {"f": {"kind": "fake"}}, port)
    assert (
        served_by(client.complete("x", max_tokens=3)) == "remote"
    )  # the kept connection is dead: sent again on a new one
    assert front.engine("remote")["workers"][0]["restarts"] == 0


@pytest.mark.parametrize("answer", ["429", "503"])
def test_an_upstream_answering_429_or_5xx_opens_the_circuit_and_traffic_degrades(make_daemon, answer):
    if answer == "429":  # the upstream's only engine is busy: one request runs and none may wait
        upstream = start_upstream(
            make_daemon, {"f": {"kind": "fake", "max_queue": 0, "options": {"token_delay_s": 0.05}}}
        )
        blocker = upstream.client()
        first = next(blocker.generate(prompt="x", max_tokens=8000, stream=True))
        assert first["event"] == "token", first
    else:  # the upstream's only engine cannot run: 503 engine_unavailable
        upstream = start_upstream(make_daemon, {"f": {"kind": "fake", "options": {"fail_load": "unavailable"}}})
    front = make_daemon({"remote": remote_engine(upstream), "degrade": DEGRADE}, supervision=FAST_SUPERVISION)
    client = front.client()
    # Refused before any token: the worker exits as a crash and the request is retried on the engine taking traffic now.
    retried = client.complete("x", max_tokens=3)
    assert served_by(retried) == "degrade"
    assert wait_until(lambda: request_end(front, retried["id"]), 10, "the request's end logged")["attempts"] == 2
    pinned = client.complete(
        "x", max_tokens=3, engine="remote"
    )  # the restarted worker is refused too: the circuit opens
    assert pinned["event"] == "error" and pinned["code"] == "engine_failed", pinned
    remote = front.engine("remote")
    assert remote["circuit"] == "open" and answer in remote["reason"], remote
    assert (
        remote["workers"][0]["failure"]["code"] == "engine_failed"
        and answer in remote["workers"][0]["failure"]["message"]
    )
    assert f"last exit: exited with code 1 (upstream answered {answer}" in format_status(
        front.status()
    )  # `node-supervisor status`
    assert served_by(client.complete("x", max_tokens=3)) == "degrade"
    if answer == "429":
        blocker.cancel(first["id"])


# --- the API key -----------------------------------------------------------------------------


def test_the_key_comes_from_the_environment_and_is_never_written_anywhere(make_daemon, monkeypatch):
    monkeypatch.setenv("NS_TEST_UPSTREAM_KEYS", UPSTREAM_KEY)  # the upstream's own keys (its [http] api_keys_env)
    monkeypatch.setenv("NS_TEST_REMOTE_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("NS_TEST_WRONG_KEY", WRONG_KEY)
    monkeypatch.delenv("NS_TEST_UNSET_KEY", raising=False)
    upstream = start_upstream(make_daemon, {"f": {"kind": "fake"}}, http={"api_keys_env": ["NS_TEST_UPSTREAM_KEYS"]})
    front = make_daemon(
        {
            "remote": remote_engine(upstream, api_key_env="NS_TEST_REMOTE_KEY"),
            "wrong": remote_engine(upstream, 11, api_key_env="NS_TEST_WRONG_KEY"),
            "unset": remote_engine(upstream, 12, api_key_env="NS_TEST_UNSET_KEY"),
            "keyless": remote_engine(upstream, 13),
            "degrade": DEGRADE,
        },
        supervision=FAST_SUPERVISION,
        start=False,
    ).start(wait_ready=False)
    states = {
        "remote": "ready",
        "wrong": "model_load_failed",
        "unset": "engine_unavailable",
        "keyless": "model_load_failed",
    }
    status = front.wait_for(lambda s: {e["name"]: e["state"] for e in s["engines"] if e["name"] in states} == states)
    reasons = {e["name"]: e["reason"] for e in status["engines"]}
    assert "401" in reasons["wrong"] and "401" in reasons["keyless"], reasons
    assert "NS_TEST_UNSET_KEY" in reasons["unset"] and "unset" in reasons["unset"], reasons
    client = front.client()
    assert served_by(client.complete("x", max_tokens=3, engine="remote")) == "remote"
    refused = client.complete("x", max_tokens=3, engine="wrong")
    assert refused["event"] == "error" and refused["code"] == "model_load_failed"
    written = [
        str(front.status()),
        *(path.read_text(errors="replace") for path in front.state_dir.rglob("*") if path.is_file()),
    ]
    assert any("401" in text for text in written[1:])  # the refusals were logged ...
    assert not [text for text in written if UPSTREAM_KEY in text or WRONG_KEY in text]  # ... and no key was


# --- llama.cpp upstream ---------------------------------------------------------------------


@pytest.mark.real_engine
def test_a_llama_cpp_upstream_streams_through_token_by_token(make_daemon):
    upstream = start_upstream(make_daemon, {"llama": LLAMA})
    front = make_daemon(
        {"remote": remote_engine(upstream, model="llama"), "degrade": DEGRADE}, supervision=FAST_SUPERVISION
    )
    ask = {
        "messages": [{"role": "user", "content": "Count from one to ten."}],
        "max_tokens": 24,
        "temperature": 0.0,
        "seed": 1,
        "stream": True,
    }
    direct_tokens, direct = collect(upstream.client(timeout_s=120).generate(**ask))
    tokens, done = collect(front.client(timeout_s=120).generate(**ask))
    assert served_by(done) == "remote" and len(tokens) >= 2
    assert "".join(t["text"] for t in tokens) == "".join(t["text"] for t in direct_tokens)
    assert done["usage"] == direct["usage"] and done["finish_reason"] == direct["finish_reason"]
    assert len(tokens) == len(direct_tokens)  # one event per upstream chunk: the HTTP front writes one per token event


# --- configuration and small parts ---------------------------------------------------------------


def test_an_upstream_table_configures_the_remote_engine(monkeypatch):
    monkeypatch.setenv("NODESUP_ENGINES__CLOUD__UPSTREAM__READ_TIMEOUT_S", "90")
    upstream = {"base_url": "https://api.example.com/v1/", "model": "gpt-4o-mini", "api_key_env": "CLOUD_KEY"}
    settings = load_settings(None, {"engines": {"cloud": {"kind": "openai", "upstream": upstream}}})
    cloud = settings.engines["cloud"]
    assert cloud.upstream.base_url == "https://api.example.com/v1"  # paths are appended to it
    assert (cloud.upstream.read_timeout_s, cloud.upstream.connect_timeout_s, cloud.upstream.send_top_k) == (
        90.0,
        5.0,
        False,
    )
    assert cloud.is_remote and not cloud.uses_gpu  # never waits for, or makes room on, a GPU
    assert "upstream" in LOAD_FIELDS  # a reload that changes it starts a new worker


@pytest.mark.parametrize(
    "engine, key, words",
    [
        ({"kind": "openai"}, "engines.r", "upstream: required"),
        ({"kind": "fake", "upstream": {"base_url": "http://h/v1"}}, "engines.r", "upstream: only for kind openai"),
        (
            {"kind": "openai", "model": "/m.gguf", "upstream": {"base_url": "http://h/v1"}},
            "engines.r",
            "upstream.model",
        ),
        ({"kind": "openai", "upstream": {"base_url": "ftp://h/v1"}}, "engines.r.upstream.base_url", "http://"),
        (
            {"kind": "openai", "upstream": {"base_url": "http://user:secret@h/v1"}},
            "engines.r.upstream.base_url",
            "api_key_env",
        ),
        ({"kind": "openai", "upstream": {"base_url": "http://h/v1?x=1"}}, "engines.r.upstream.base_url", "query"),
        (
            {"kind": "openai", "upstream": {"base_url": "http://h/v1", "api_key_env": "sk-1234"}},
            "engines.r.upstream.api_key_env",
            "pattern",
        ),
        (
            {"kind": "openai", "upstream": {"base_url": "http://h/v1", "api_key": "sk-1234"}},
            "engines.r.upstream.api_key",
            "Extra inputs",
        ),
        (
            {"kind": "openai", "upstream": {"base_url": "http://h/v1", "read_timeout_s": 0}},
            "engines.r.upstream.read_timeout_s",
            "greater than 0",
        ),
    ],
)
def test_a_bad_upstream_table_names_the_key(engine, key, words):
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"engines": {"r": engine}})
    assert key + ":" in str(caught.value) and words in str(caught.value), str(caught.value)
    assert "sk-1234" not in str(caught.value)  # a key put where a variable's name belongs is not echoed


def test_retry_after_is_read_as_seconds_or_a_date_and_capped_at_an_hour():
    assert retry_after("7") == 7.0 and retry_after("1.5") == 1.5
    assert retry_after("999999") == 3600.0 and retry_after("-3") == 0.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
    assert 50 < retry_after(email.utils.formatdate(time.time() + 60, usegmt=True)) <= 60
    assert retry_after(None) is None and retry_after("soon") is None
