"""Ollama's API on the HTTP front, through the official `ollama` Python client against a real daemon.

Fake engines for the mechanics (NDJSON chunks, the final object's fields, what reaches the engine,
load and unload through keep_alive, listings, errors); the default model (the real llama.cpp worker) for
completion with a seed and for `format` with a JSON schema.
"""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx
import jsonschema
import ollama
import pytest

from .conftest import LLAMA, Daemon, wait_until
from .test_cancel import request_ends
from .test_http import base_url, fake_words, http_settings

FAST = {"kind": "fake", "priority": 10, "options": {"token_delay_s": 0.001}}
ENGINES = {
    "f": FAST,
    "echo": {"kind": "fake", "priority": 20, "aliases": ["echo-alias"], "options": {"echo_request": True}},
    "lazy": {**FAST, "priority": 30, "standby": "cold"},
    "crashy": {"kind": "fake", "priority": 40, "options": {"token_delay_s": 0.01, "crash_after_tokens": 3}},
    "slow": {"kind": "fake", "priority": 50, "options": {"token_delay_s": 0.2}},
    "broken": {"kind": "llamacpp", "model": "/nonexistent/missing.gguf", "priority": 60},
}


@pytest.fixture(scope="module")
def daemon(shared_state: dict[str, Path]) -> Iterator[Daemon]:
    started = Daemon(shared_state, ENGINES, **http_settings())
    try:
        started.start(wait_ready=False)  # "lazy" loads on demand only
        started.wait_for(lambda s: all(e["state"] in ("ready", "model_not_found") for e in s["engines"][:2]), 120)
        started.wait_for(lambda s: all(e["name"] == "lazy" or e["state"] != "spawning" for e in s["engines"]), 120)
        yield started
    finally:
        started.stop()


def client(daemon: Daemon, timeout: float = 30.0) -> ollama.Client:
    return ollama.Client(host=base_url(daemon), timeout=timeout)


def echoed(response: Any) -> dict[str, Any]:
    """What the echoing fake engine received."""
    text = response.response if hasattr(response, "response") and response.response is not None else None
    return json.loads(text if text is not None else response.message.content)


def post(api: ollama.Client, path: str, body: dict[str, Any]) -> Any:
    """A body the client itself would refuse to send, through its own transport and error handling."""
    return api._request_raw("POST", path, json=body)


def workers(daemon: Daemon) -> dict[str, tuple[Any, int]]:
    """Each engine's worker pid and restart count: an engine unharmed keeps both."""
    return {e["name"]: (e["workers"][0]["pid"], e["workers"][0]["restarts"]) for e in daemon.status()["engines"]}


# --- mechanics on the fake engine ------------------------------------------------------------------


def test_generate_streams_ndjson_lines_and_ends_with_the_final_fields(daemon):
    parts = list(client(daemon).generate(model="f", prompt="one two", stream=True, options={"num_predict": 5}))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.response for p in parts) == fake_words(5) and parts[-1].response == ""
    last = parts[-1]
    assert last.done_reason == "length" and last.eval_count == 5 and last.prompt_eval_count == 2
    assert last.total_duration > 0 and last.total_duration >= last.eval_duration >= 0
    assert isinstance(last.load_duration, int) and isinstance(last.prompt_eval_duration, int)
    assert all(p.model == "f" and p.created_at for p in parts)


def test_generate_and_chat_whole_and_the_stream_content_type(daemon):
    whole = client(daemon).generate(model="f", prompt="hi", options={"num_predict": 4})
    assert whole.response == fake_words(4) and whole.done and whole.done_reason == "length"
    chat = client(daemon).chat(model="f", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
    assert chat.message.role == "assistant" and chat.message.content == fake_words(3) and chat.eval_count == 3
    pieces = list(
        client(daemon).chat(
            model="f", messages=[{"role": "user", "content": "hi"}], stream=True, options={"num_predict": 3}
        )
    )
    assert "".join(p.message.content for p in pieces) == fake_words(3) and pieces[-1].done
    with httpx.stream(
        "POST", base_url(daemon) + "/api/generate", json={"model": "f", "prompt": "x", "options": {"num_predict": 2}}
    ) as raw:  # streaming is Ollama's default: no "stream" field at all
        assert raw.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in raw.iter_lines() if line]
    assert len(lines) == 3 and lines[-1]["done"] is True


def test_options_format_and_messages_reach_the_engine_mapped(daemon):
    options = {
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 7,
        "min_p": 0.05,
        "seed": 42,
        "num_predict": 9,
        "stop": ["zz"],
        "repeat_penalty": 1.1,
        "presence_penalty": 0.2,
        "frequency_penalty": 0.3,
        "repeat_last_n": 32,
        "num_ctx": 4096,  # a load-time option: ignored
        "num_gpu": 0,
        "mirostat": 0,  # off: changes nothing
    }
    seen = echoed(client(daemon).generate(model="echo", prompt="the prompt", options=options, format="json"))
    params = seen["params"]
    assert seen["prompt"] == "the prompt" and seen["messages"] is None
    expected = {"temperature": 0.3, "top_p": 0.9, "top_k": 7, "min_p": 0.05, "seed": 42, "max_tokens": 9}
    expected |= {"stop": ["zz"], "repeat_penalty": 1.1, "presence_penalty": 0.2, "frequency_penalty": 0.3}
    assert {k: params[k] for k in expected} == expected and params["penalty_last_n"] == 32
    assert params["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    seen = echoed(client(daemon).chat(model="echo-alias", messages=messages, format=schema))
    assert seen["messages"] == messages and seen["prompt"] is None
    assert seen["params"]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "format", "schema": schema},
    }
    # No num_predict (or a negative one): until the model stops, as Ollama's, up to the daemon's limit.
    assert echoed(client(daemon).generate(model="echo", prompt="x"))["params"]["max_tokens"] == 8192
    assert (
        echoed(client(daemon).generate(model="echo:latest", prompt="x", options={"num_predict": -1}))["params"][
            "max_tokens"
        ]
        == 8192
    )


def test_keep_alive_loads_and_unloads_as_ollama_and_ps_shows_it(daemon):
    api = client(daemon, timeout=60.0)
    assert "lazy" not in [m.model for m in api.ps().models]
    loaded = api.generate(model="lazy", keep_alive="10m")  # an empty prompt: load
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    (entry,) = [m for m in api.ps().models if m.model == "lazy"]
    ahead = (entry.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 500 < ahead <= 600 and entry.name == "lazy" and entry.size_vram == 0
    gone = api.generate(model="lazy", keep_alive=0)  # an empty prompt with keep_alive 0: unload
    assert gone.done_reason == "unload"
    assert "lazy" not in [m.model for m in api.ps().models]
    daemon.wait_for(lambda s: next(e for e in s["engines"] if e["name"] == "lazy")["state"] == "stopped", 30)
    # /api/chat without messages loads too; a request's keep_alive -1 keeps it for ever ("1h30m": Go's durations).
    assert api.chat(model="lazy", messages=[], keep_alive="1h30m").done_reason == "load"
    (entry,) = [m for m in api.ps().models if m.model == "lazy"]
    assert 5300 < (entry.expires_at - datetime.now(timezone.utc)).total_seconds() <= 5400
    api.generate(model="lazy", prompt="x", options={"num_predict": 1}, keep_alive=-1)
    (entry,) = [m for m in api.ps().models if m.model == "lazy"]
    assert entry.expires_at.year > 2300
    api.generate(model="lazy", keep_alive=0)


def test_tags_show_version_and_liveness(daemon):
    api = client(daemon)
    listed = {m.model: m for m in api.list().models}
    assert set(listed) == {"f", "echo", "echo-alias", "lazy", "crashy", "slow", "broken"}
    assert listed["f"].details.format == "fake" and len(listed["f"].digest) == 64
    raw = httpx.get(base_url(daemon) + "/api/tags").json()["models"]
    status = {m["name"]: m["status"] for m in raw}
    assert status["broken"]["value"] == "unavailable" and "missing.gguf" in status["broken"]["reason"]
    assert status["f"] == {"value": "loaded"}
    shown = api.show("echo-alias")
    assert shown.details.family == "fake" and shown.capabilities == ["completion"]
    with pytest.raises(ollama.ResponseError) as error:
        api.show("nope")
    assert error.value.status_code == 404 and error.value.error == 'model "nope" not found, try pulling it first'
    assert httpx.get(base_url(daemon) + "/api/version").json()["version"]
    assert "Ollama is running" in httpx.get(base_url(daemon) + "/").text
    assert httpx.head(base_url(daemon) + "/").status_code == 200


@pytest.mark.parametrize(
    "call, status, words",
    [
        (lambda api: api.generate(model="nope", prompt="x"), 404, 'model "nope" not found, try pulling it first'),
        (lambda api: api.generate(model="f", prompt="x", options={"temperature": "hot"}), 400, "options.temperature"),
        (lambda api: api.generate(model="f", prompt="x", options={"num_predict": 1.5}), 400, "options.num_predict"),
        (lambda api: api.generate(model="f", prompt="x", options={"repeat_last_n": -9}), 400, "options.repeat_last_n"),
        (lambda api: api.generate(model="f", prompt="x", options={"frobnicate": 1}), 400, "options.frobnicate"),
        (lambda api: api.generate(model="f", prompt="x", options={"mirostat": 2}), 400, "options.mirostat"),
        (lambda api: api.generate(model="f", prompt="x", keep_alive="soon"), 400, "keep_alive"),
        (lambda api: api.generate(model="f", prompt="x", images=[b"\x89PNG\r\n"]), 400, "images"),
        (lambda api: api.generate(model="f", prompt="x", template="{{ .Prompt }}"), 400, "template"),
        (lambda api: api.generate(model="f", prompt="x", system="be nice"), 400, "system"),
        (lambda api: api.generate(model="f", prompt="x", think=True), 400, "think"),
        (lambda api: post(api, "/api/generate", {"model": "f", "prompt": "x", "format": "yaml"}), 400, "format"),
        (lambda api: post(api, "/api/generate", {"model": "f", "prompt": "x", "keep_alive": [5]}), 400, "keep_alive"),
        (lambda api: post(api, "/api/generate", {"model": "f", "prompt": 3}), 400, "prompt"),
        (lambda api: post(api, "/api/chat", {"model": "f", "messages": "hi"}), 400, "messages"),
        (lambda api: post(api, "/api/generate", {"model": "f", "prompt": "x", "options": [1]}), 400, "options"),
        (
            lambda api: post(
                api,
                "/api/chat",
                {
                    "model": "f",
                    "messages": [{"role": "user", "content": "x"}],
                    "tools": [{"type": "function", "function": {"parameters": {}}}],
                },
            ),
            400,
            "tools[0].function.name",
        ),  # fmt: skip
        (
            lambda api: api.chat(model="f", messages=[{"role": "user", "content": "x", "images": [b"\x89PNG"]}]),
            400,
            "messages[0].images",
        ),
        (lambda api: api.chat(model="f", messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
        (lambda api: api.chat(model="f", messages=[{"role": "tool", "content": "x"}]), 400, "messages[0]"),  # no tools
    ],
)
def test_bad_input_is_a_clear_error_and_harms_nothing(daemon, call, status, words):
    before = workers(daemon)
    with pytest.raises(ollama.ResponseError) as error:
        result = call(client(daemon))
        list(result) if not hasattr(result, "done") else None
    assert error.value.status_code == status and words in error.value.error, error.value
    assert workers(daemon) == before


def test_an_error_after_the_first_chunk_is_an_ndjson_error_line(daemon):
    chunks = []
    with pytest.raises(ollama.ResponseError) as error:
        for part in client(daemon).generate(model="crashy", prompt="x", stream=True, options={"num_predict": 50}):
            chunks.append(part.response)
    assert chunks and "".join(chunks) == fake_words(len(chunks)), chunks
    assert "worker" in error.value.error or "engine" in error.value.error, error.value


def test_a_client_that_goes_away_cancels_its_request_quietly(daemon):
    with httpx.stream(
        "POST",
        base_url(daemon) + "/api/generate",
        json={"model": "slow", "prompt": "x", "options": {"num_predict": 500}},
    ) as raw:
        first = next(raw.iter_lines())
        assert json.loads(first)["done"] is False
    end = wait_until(
        lambda: [e for e in request_ends(daemon) if e.get("engine") == "slow" and e.get("finish_reason")], 30, "an end"
    )
    assert end[-1]["finish_reason"] == "cancelled" and end[-1]["tokens"] < 50, end
    assert "Traceback" not in daemon.log_text()


def test_keys_guard_the_ollama_routes_but_not_liveness(make_daemon, tmp_path):
    key = "sk-ollama-test-1234567890"
    keys = tmp_path / "keys"
    keys.write_text(key + "\n")
    keys.chmod(0o600)
    guarded = make_daemon({"f": FAST}, **http_settings(api_keys_file=str(keys)))
    with pytest.raises(ollama.ResponseError) as error:
        client(guarded).list()
    assert error.value.status_code == 401
    authorized = ollama.Client(host=base_url(guarded), headers={"Authorization": f"Bearer {key}"})
    assert [m.model for m in authorized.list().models] == ["f"]
    assert urllib.request.urlopen(base_url(guarded) + "/", timeout=10).status == 200


# --- the default model (the real llama.cpp worker) --------------------------------------------------

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "kind": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "kind", "tags"],
}


@pytest.fixture(scope="module")
def llama(shared_state: dict[str, Path]) -> Iterator[Daemon]:
    started = Daemon(shared_state, {"llama": LLAMA}, **http_settings())
    try:
        yield started.start()
    finally:
        started.stop()


@pytest.mark.real_engine
def test_the_default_model_completes_and_the_same_seed_gives_the_same_text(llama):
    api = client(llama, timeout=300.0)
    options = {"seed": 7, "temperature": 0.9, "num_predict": 24}
    first = api.generate(model="llama", prompt="Once upon a time", options=options)
    streamed = "".join(
        p.response for p in api.generate(model="llama", prompt="Once upon a time", options=options, stream=True)
    )
    assert first.response and first.response == streamed
    assert first.eval_count > 0 and first.prompt_eval_count > 0 and first.done_reason in ("stop", "length")
    other = api.generate(model="llama", prompt="Once upon a time", options={**options, "seed": 8})
    assert other.response != first.response
    (model,) = api.list().models
    assert model.details.format == "gguf" and model.details.family == "gemma3" and model.size > 0
    assert model.details.parameter_size.endswith("M") and model.details.quantization_level
    shown = api.show("llama")
    assert shown.modelinfo["general.architecture"] == "gemma3" and shown.modelinfo["gemma3.block_count"] > 0
    (loaded,) = api.ps().models
    assert loaded.model == "llama" and loaded.size > 0 and loaded.context_length == LLAMA["n_ctx"]


@pytest.mark.real_engine
def test_format_with_a_json_schema_validates_whole_and_streamed(llama):
    api = client(llama, timeout=300.0)
    prompt = "A pet described as JSON: "
    whole = api.generate(model="llama", prompt=prompt, format=PET, options={"temperature": 0, "num_predict": 200})
    assert whole.done_reason == "stop", whole
    jsonschema.validate(json.loads(whole.response), PET)
    streamed = api.generate(
        model="llama", prompt=prompt, format=PET, stream=True, options={"seed": 3, "num_predict": 200}
    )
    jsonschema.validate(json.loads("".join(p.response for p in streamed)), PET)


@pytest.mark.real_engine
def test_bad_input_leaves_the_real_worker_unharmed(llama):
    before = workers(llama)
    api = client(llama)
    for call in (
        lambda: api.generate(model="nope", prompt="x"),
        lambda: api.generate(model="llama", prompt="x", options={"top_k": "many"}),
        lambda: api.generate(model="llama", prompt="x", keep_alive="1 fortnight"),
        lambda: api.generate(model="llama", prompt="x", images=[b"\x89PNG"]),
        lambda: api.generate(model="llama", prompt="x", format={"type": "frob"}),
    ):
        with pytest.raises(ollama.ResponseError) as error:
            call()
        assert error.value.status_code in (400, 404) and error.value.error
    assert workers(llama) == before


def test_ollamas_other_endpoints_answer_404_in_its_shape(daemon):
    with pytest.raises(ollama.ResponseError) as pulled:
        client(daemon).pull("llama3")
    assert pulled.value.status_code == 404 and "/api/pull is not served here" in pulled.value.error
    reply = httpx.delete(base_url(daemon) + "/api/delete")
    assert reply.status_code == 404 and "models_dir" in reply.json()["error"]
