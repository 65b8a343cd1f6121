"""The HTTP front, through the official `openai` client (and raw HTTP where the wire itself is the point).

A real daemon with fake engines serves on a free loopback port; what the
client sees is checked against what the daemon did (its status, its
"request end" log lines).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.config import ConfigError, load_settings
from supervisor.node.envs import env_python

from .conftest import CLI, LLAMA, Daemon, wait_until
from .test_startup import clean_environ, write_config

WORDS = "the quick brown fox jumps over the lazy dog".split()
KEY = "sk-test-6f1d2c9a0b7e4e55"


def fake_words(count: int) -> str:
    """What the fake engine generates: its words in turn, each followed by a space."""
    return "".join(WORDS[i % len(WORDS)] + " " for i in range(count))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_settings(**http: Any) -> dict[str, Any]:
    return {"http": {"listen": f"127.0.0.1:{free_port()}", **http}}


def base_url(daemon: Daemon) -> str:
    listen = load_settings(daemon.config_path).http.listen
    return f"http://{listen}"


def openai_client(daemon: Daemon, api_key: str = "unused", **options: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url(daemon) + "/v1",
        api_key=api_key,
        max_retries=0,
        timeout=options.pop("timeout", 30.0),
        **options,
    )


def get(daemon: Daemon, path: str, key: str | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(base_url(daemon) + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def scrape(daemon: Daemon, key: str | None = None) -> tuple[int, dict[str, Any]]:
    """GET /metrics on the HTTP front: (status, {family name: type}) parsed by prometheus-client's own parser."""
    request = urllib.request.Request(
        base_url(daemon) + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {f.name: f.type for f in text_string_to_metric_families(response.read().decode())}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def request_end(daemon: Daemon, request_id: str) -> dict[str, Any] | None:
    """The daemon's "request end" log line for a request, once it is written."""
    for line in daemon.log_text().splitlines():
        if line.startswith("{") and '"request end"' in line:
            record = json.loads(line)
            if record.get("request_id") == request_id:
                return record
    return None


def wait_idle(daemon: Daemon, engine: str = "f") -> None:
    daemon.wait_for(
        lambda s: all(
            not e["in_flight"] and not e["workers"][0]["requests"] for e in s["engines"] if e["name"] == engine
        )
    )


@pytest.fixture(scope="module")
def daemon(shared_state: dict[str, Path]) -> Iterator[Daemon]:
    """Two fake engines with aliases; "f" (preferred) takes one request and queues none."""
    engines = {
        "f": {
            "kind": "fake",
            "priority": 10,
            "max_queue": 0,
            "aliases": ["gpt-4o-mini"],
            "options": {"token_delay_s": 0.01},
        },
        "g": {"kind": "fake", "priority": 20, "aliases": ["other-model"], "options": {"token_delay_s": 0.01}},
    }
    started = Daemon(shared_state, engines, **http_settings())
    try:
        yield started.start()
    finally:
        started.stop()


# --- answers ------------------------------------------------------------------------


def test_chat_completion_without_streaming(daemon):
    reply = openai_client(daemon).chat.completions.create(
        model="f", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "f"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == fake_words(5)
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 5 and reply.usage.total_tokens == reply.usage.prompt_tokens + 5
    assert request_end(daemon, reply.id)["engine"] == "f"


def test_chat_stream_assembles_the_text_and_ends_with_usage(daemon):
    stream = openai_client(daemon).chat.completions.create(
        model="f",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == fake_words(6)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1


def test_the_raw_stream_is_server_sent_events_ending_with_done(daemon):
    body = json.dumps({"model": "f", "prompt": "x", "max_tokens": 3, "stream": True}).encode()
    request = urllib.request.Request(
        base_url(daemon) + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: ") for event in events[:-1])
    texts = [json.loads(event[6:])["choices"][0]["text"] for event in events[:-2]]
    assert "".join(texts) == fake_words(3)


def test_completions_default_to_sixteen_tokens_streamed_or_not(daemon):
    client = openai_client(daemon)
    whole = client.completions.create(model="default", prompt="Once")
    assert whole.object == "text_completion" and whole.choices[0].text == fake_words(16)
    assert whole.usage.completion_tokens == 16 and whole.choices[0].finish_reason == "length"
    pieces = list(client.completions.create(model="f", prompt="Once", max_tokens=4, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == fake_words(4)
    assert pieces[-1].choices[0].finish_reason == "length"


def test_models_list_engines_and_aliases_and_an_alias_selects_its_engine(daemon):
    client = openai_client(daemon)
    listed = {m.id: m.model_extra["root"] for m in client.models.list().data}
    assert listed == {"f": "f", "g": "g", "gpt-4o-mini": "f", "other-model": "g"}
    assert client.models.retrieve("other-model").owned_by == "node-supervisor"
    reply = client.chat.completions.create(
        model="other-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.model == "other-model"
    assert request_end(daemon, reply.id)["engine"] == "g"


# --- errors -------------------------------------------------------------------------


def test_an_unknown_model_is_not_found(daemon):
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client(daemon).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        openai_client(daemon).models.retrieve("no-such-model")


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": 9}, "temperature"),  # the protocol's own range check, its field named
        (
            {"max_completion_tokens": 0},
            "max_completion_tokens",
        ),  # the protocol's max_tokens, under the name the request used
        ({"n": 2}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs, as OpenAI refuses it
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name"),
        ({"functions": [{"name": "f"}]}, "functions"),  # the deprecated form of tools
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
                ]
            },
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "function", "content": "42", "name": "t"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "t"}]}, "messages[0]"),  # without tools
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"5": 500}}, "logit_bias[5]"),
        ({"extra_body": {"repeat_penalty": 0}}, "repeat_penalty"),
    ],
)
def test_a_bad_or_unsupported_parameter_is_a_bad_request_naming_it(daemon, fields, param):
    request = {"model": "f", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(daemon).chat.completions.create(**request)
    assert caught.value.param == param, caught.value.body
    assert caught.value.body["type"] == "invalid_request_error"


def test_a_body_over_the_message_limit_is_too_large_and_one_not_json_a_bad_request(daemon):
    for body, status, code in (
        (b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, "message_too_large"),
        (b"[1, 2]", 400, "malformed_message"),
    ):
        request = urllib.request.Request(
            base_url(daemon) + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert (caught.value.code, json.loads(caught.value.read())["error"]["code"]) == (status, code)


def test_a_full_engine_is_rate_limited(daemon):
    client = openai_client(daemon)
    running = client.completions.create(model="f", prompt="x", max_tokens=2000, stream=True)
    first = next(iter(running))  # running now: "f" has max_queue 0
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="gpt-4o-mini", prompt="x", max_tokens=2)
    assert caught.value.code == "busy"
    running.close()
    wait_until(lambda: request_end(daemon, first.id), 10, "the running request ended")
    wait_idle(daemon)


# --- cancels ------------------------------------------------------------------------


def test_closing_a_stream_cancels_its_request(daemon):
    stream = openai_client(daemon).chat.completions.create(
        model="f", messages=[{"role": "user", "content": "hi"}], max_tokens=2000, stream=True
    )
    seen = [chunk for _, chunk in zip(range(4), stream)]
    stream.close()
    end = wait_until(lambda: request_end(daemon, seen[0].id), 10, "the request's end logged")
    assert end["outcome"] == "done" and end["finish_reason"] == "cancelled", end
    assert end["tokens"] < 2000
    wait_idle(daemon)


def test_a_client_that_gives_up_on_a_whole_answer_cancels_its_request(daemon):
    with pytest.raises(openai.APITimeoutError):
        openai_client(daemon, timeout=1.0).completions.create(model="f", prompt="x", max_tokens=2000)
    wait_idle(daemon)
    ends = [json.loads(line) for line in daemon.log_text().splitlines() if '"request end"' in line]
    assert ends[-1]["finish_reason"] == "cancelled" and ends[-1]["tokens"] < 2000, ends[-1]


# --- health ---------------------------------------------------------------------------


def test_healthz_and_readyz_when_an_engine_serves(daemon):
    assert get(daemon, "/healthz") == (200, {"status": "ok"})
    status, body = get(daemon, "/readyz")
    assert status == 200 and body["ready"] is True
    assert {e["name"]: e["state"] for e in body["engines"]} == {"f": "ready", "g": "ready"}
    assert get(daemon, "/v1/nowhere") == (
        404,
        {"error": {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}},
    )
    assert get(daemon, "/v1/chat/completions")[0] == 405
    status, families = scrape(daemon)  # the Prometheus exposition rides on the front when it is on
    assert status == 200 and families["node_supervisor_time_to_first_token_seconds"] == "histogram", families


def test_keys_are_required_when_configured_and_readyz_says_why_nothing_serves(make_daemon, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# one key a line\n\n{KEY}\n")
    keys.chmod(0o600)
    down = {"kind": "fake", "options": {"fail_load": "unavailable"}}
    daemon = make_daemon({"f": down}, **http_settings(api_keys_file=str(keys)))
    for wrong in ("unused", KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as caught:
            openai_client(daemon, api_key=wrong).models.list()
        assert caught.value.code == "invalid_api_key"
    client = openai_client(daemon, api_key=KEY)
    (listed,) = client.models.list().data  # listed, marked: it cannot serve now
    assert listed.id == "f" and listed.model_dump()["status"]["value"] == "unavailable"
    with pytest.raises(openai.InternalServerError) as caught:  # 503: the only engine cannot serve
        client.completions.create(model="f", prompt="x", max_tokens=2)
    assert caught.value.status_code == 503 and caught.value.code == "engine_unavailable"
    status, body = get(daemon, "/readyz")
    assert (
        status == 503 and body["ready"] is False and body["engines"] == [{"name": "f", "state": "engine_unavailable"}]
    )
    status, body = get(daemon, "/readyz", key=KEY)
    assert status == 503 and "reason" in body["engines"][0]
    assert (
        scrape(daemon)[0] == 401 and scrape(daemon, key=KEY)[0] == 200
    )  # /metrics names engines and spend: keys apply


def test_a_worker_failing_mid_stream_ends_the_stream_with_an_error_event(make_daemon):
    engine = {"kind": "fake", "options": {"token_delay_s": 0.01, "stuck_after_tokens": 3}}
    supervision = {"stall_timeout_s": 1.0, "kill_grace_s": 0.3, "probe_interval_s": 0}
    daemon = make_daemon({"f": engine}, heartbeat_interval_s=0.3, supervision=supervision, **http_settings())
    stream = openai_client(daemon).completions.create(model="f", prompt="x", max_tokens=50, stream=True)
    texts = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert "".join(texts) == fake_words(3)
    assert caught.value.body["code"] == "engine_failed" and caught.value.body["type"] == "server_error"


def test_shutdown_ends_a_running_stream_with_an_error_event(make_daemon, tmp_path):
    daemon = make_daemon(
        {"f": {"kind": "fake", "options": {"token_delay_s": 0.01}}}, shutdown_grace_s=0.5, **http_settings()
    )
    stream = openai_client(daemon).completions.create(model="f", prompt="x", max_tokens=5000, stream=True)
    next(iter(stream))
    daemon.process.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert caught.value.body["code"] == "shutting_down"
    assert daemon.process.wait(timeout=30) == 0


# --- configuration ------------------------------------------------------------------------


def test_beyond_loopback_without_a_key_the_daemon_refuses_to_start(tmp_path):
    config = write_config(tmp_path, raw=f'[http]\nlisten = "0.0.0.0:{free_port()}"')
    result = subprocess.run(
        [*CLI, "--config", str(config), "run", "--no-create-envs"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_environ(),
    )
    assert result.returncode == 78, result.stderr
    assert "http.api_keys_file" in result.stderr and "Traceback" not in result.stderr


def test_run_http_flag_overrides_the_listen_address_only(tmp_path):
    from supervisor.cli import _parser, _settings

    config = write_config(tmp_path, raw='[http]\nlisten = "127.0.0.1:1"\napi_keys_env = ["MY_KEY"]')
    settings = _settings(_parser().parse_args(["--config", str(config), "run", "--http", "[::1]:8080"]))
    assert settings.http.listen == "[::1]:8080" and settings.http.api_keys_env == ["MY_KEY"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"http": {"listen": "8080"}}, "http.listen"),
        ({"http": {"listen": "localhost:70000"}}, "http.listen"),
        ({"http": {"header_timeout_s": 0}}, "http.header_timeout_s"),
        ({"http": {"max_connections_per_client": 0}}, "http.max_connections_per_client"),
        ({"http": {"fd_reserve": 4}}, "http.fd_reserve"),
        ({"engines": {"a": {"kind": "fake", "aliases": ["b"]}, "b": {"kind": "fake"}}}, "engines.a.aliases"),
        (
            {"engines": {"a": {"kind": "fake", "aliases": ["m"]}, "b": {"kind": "fake", "aliases": ["m"]}}},
            "engines.b.aliases",
        ),
    ],
)
def test_bad_http_settings_and_clashing_aliases_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(None, overrides)


# --- the real engine ---------------------------------------------------------------------------


@pytest.mark.real_engine
def test_a_chat_completion_on_the_default_model(make_daemon):
    daemon = make_daemon({"llama": LLAMA}, **http_settings())
    reply = openai_client(daemon, timeout=120.0).chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Name one colour."}],
        max_tokens=16,
        temperature=0,
        seed=1,
    )
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 5


@pytest.mark.real_engine
def test_penalties_and_a_logit_bias_reach_the_default_model(make_daemon):
    """OpenAI's penalties and bias (and llama-server's repeat_penalty) change what the model writes
    after a repetitive prompt; the same request with the same seed writes the same text."""
    daemon = make_daemon({"llama": LLAMA}, **http_settings())
    client = openai_client(daemon, timeout=120.0)
    prompt = "one two three one two three one two three one two three one two three"

    def complete(**fields: Any) -> str:
        reply = client.completions.create(model="default", prompt=prompt, max_tokens=12, seed=3, **fields)
        return reply.choices[0].text

    plain = complete(temperature=0)
    assert plain.split()[:6] == ["one", "two", "three"] * 2  # the loop the penalties break
    for fields in (
        {"frequency_penalty": 1.5},
        {"presence_penalty": 1.5},
        {"extra_body": {"repeat_penalty": 1.5}},
    ):
        penalized = complete(temperature=0.7, **fields)
        assert penalized != complete(temperature=0.7) and penalized == complete(temperature=0.7, **fields), fields
    biased = complete(temperature=0, logit_bias={str(first_token(daemon.shared, " banana")): 100})
    assert biased.startswith(" banana")


def first_token(state: dict[str, Path], text: str) -> int:
    """The default model's first token for ``text``, as llama.cpp's tokenizer (in its environment) splits it."""
    script = (
        "import sys, llama_cpp; m = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False); "
        "print(m.tokenize(sys.argv[2].encode(), add_bos=False)[0])"
    )
    python = env_python(state["envs_dir"] / "llamacpp")
    out = subprocess.run([str(python), "-c", script, str(state["model"]), text], capture_output=True, text=True)
    return int(out.stdout.strip())


def test_a_parameter_no_engine_can_serve_is_unsupported_naming_it_and_the_engines(make_daemon):
    """An engine lists what it can do; a request needing what only one can do goes there; none: 400."""
    engines = {
        "f": {"kind": "fake", "priority": 10, "options": {"capabilities": []}},
        "g": {"kind": "fake", "priority": 20, "options": {"capabilities": ["penalties"]}},
    }
    daemon = make_daemon(engines, **http_settings())
    daemon.wait_for(lambda s: all(e["capabilities"] is not None for e in s["engines"]))
    client = openai_client(daemon)
    chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    penalized = client.chat.completions.create(**chat, presence_penalty=0.5)
    assert penalized.choices[0].message.content == fake_words(3)
    assert wait_until(lambda: request_end(daemon, penalized.id), 10, "the request's end logged")["engine"] == "g"
    plain = client.chat.completions.create(**chat)
    assert wait_until(lambda: request_end(daemon, plain.id), 10, "the request's end logged")["engine"] == "f"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**chat, logit_bias={"5": 1})
    error = caught.value
    assert error.code == "unsupported_parameter" and error.param == "logit_bias"
    assert "f (none)" in error.message and "g (penalties)" in error.message
