"""Bad input gets an error with a specific code, and the daemon goes on serving."""

from __future__ import annotations

import json

import pytest

from .conftest import assert_nothing_after, collect

pytestmark = pytest.mark.real_engine


def assert_still_serving(daemon):
    _, done = collect(daemon.client().generate(prompt="Hello", max_tokens=4))
    assert done["event"] == "done", done


def first_error(client, request_id=None):
    event = client.receive(request_id)
    assert event["event"] == "error", event
    return event


def llama_worker(daemon):
    """(pid, restarts) of the llama engine's worker."""
    worker = daemon.engine("llama")["workers"][0]
    assert worker["pid"], worker
    return worker["pid"], worker["restarts"]


@pytest.mark.parametrize(
    "frame, code",
    [
        (b"{not json", "malformed_message"),
        (b"\xff\xfe\x00garbage", "malformed_message"),
        (b"[1, 2, 3]", "malformed_message"),
        (b'"just a string"', "malformed_message"),
        (b"", "malformed_message"),
        # Under the test daemon's 64 KiB frame limit, far over json's recursion limit.
        pytest.param(b"[" * 60_000, "malformed_message", id="nested-arrays"),
        pytest.param(
            b'{"op":"generate","id":"n1","prompt":' + b'{"a":' * 10_000, "malformed_message", id="nested-in-a-prompt"
        ),
    ],
)
def test_malformed_frames(llama_daemon, frame, code):
    client = llama_daemon.client()
    client.send_raw(frame)
    error = first_error(client, None)
    assert error["code"] == code and error["id"] is None and error["message"]
    assert_still_serving(llama_daemon)


def test_oversized_message(llama_daemon):
    client = llama_daemon.client()
    client.send_raw(json.dumps({"op": "generate", "id": "big", "prompt": "x" * 100_000}).encode())
    error = first_error(client, None)
    assert error["code"] == "message_too_large" and "65536" in error["message"]
    assert_still_serving(llama_daemon)


@pytest.mark.parametrize(
    "message, code, mentions",
    [
        ({"id": "a"}, "unknown_op", "op"),
        ({"id": "a", "op": "explode"}, "unknown_op", "explode"),
        ({"op": "status"}, "invalid_request", "id"),
        ({"op": "status", "id": 42}, "invalid_request", "id"),
        ({"op": "generate", "id": "a"}, "invalid_request", "prompt"),
        ({"op": "generate", "id": "a", "prompt": "x", "messages": []}, "invalid_request", "prompt"),
        ({"op": "generate", "id": "a", "prompt": 12}, "invalid_request", "prompt"),
        ({"op": "generate", "id": "a", "prompt": "x", "max_tokens": "ten"}, "invalid_request", "max_tokens"),
        ({"op": "generate", "id": "a", "prompt": "x", "max_tokens": 0}, "invalid_request", "max_tokens"),
        ({"op": "generate", "id": "a", "prompt": "x", "max_tokens": True}, "invalid_request", "max_tokens"),
        ({"op": "generate", "id": "a", "prompt": "x", "temperature": "hot"}, "invalid_request", "temperature"),
        ({"op": "generate", "id": "a", "prompt": "x", "stream": "yes"}, "invalid_request", "stream"),
        ({"op": "generate", "id": "a", "prompt": "x", "stop": [1]}, "invalid_request", "stop"),
        ({"op": "generate", "id": "a", "prompt": "x", "deadline_ms": -5}, "invalid_request", "deadline_ms"),
        ({"op": "generate", "id": "a", "prompt": "x", "max_token": 5}, "invalid_request", "max_token"),
        ({"op": "generate", "id": "a", "messages": [{"role": "wizard", "content": "x"}]}, "invalid_request", "role"),
        ({"op": "generate", "id": "a", "messages": "hello"}, "invalid_request", "messages"),
        ({"op": "cancel", "id": "a"}, "invalid_request", "target"),
        ({"op": "generate", "id": "a", "prompt": "x", "max_tokens": None}, "invalid_request", "max_tokens"),
        ({"op": "generate", "id": "a", "prompt": "x", "top_k": None}, "invalid_request", "top_k"),
        ({"op": "generate", "id": "a", "prompt": "x", "stop": None}, "invalid_request", "stop"),
        (
            {"op": "generate", "id": "a", "prompt": None, "messages": [{"role": "user", "content": "x"}]},
            "invalid_request",
            "prompt",
        ),
        ({"op": "cancel", "id": "a", "target": "r", "force": True}, "invalid_request", "force"),
        pytest.param({"op": "ping", "id": "a", "verbose": True}, "invalid_request", "verbose"),
        pytest.param({"op": "status", "id": "a", "verbose": True}, "invalid_request", "verbose"),
        ({"op": "generate", "id": "a", "prompt": "x", "engine": "nope"}, "unknown_engine", "nope"),
        ({"op": "generate", "id": "a", "prompt": "x", "engine": "broken"}, "model_not_found", "missing.gguf"),
    ],
)
def test_invalid_requests(llama_daemon, message, code, mentions):
    client = llama_daemon.client()
    client.send_raw(json.dumps(message).encode())
    expected_id = message.get("id") if isinstance(message.get("id"), str) else None
    error = first_error(client, expected_id)
    assert error["code"] == code, error
    assert mentions in error["message"], error
    assert_still_serving(llama_daemon)


def test_duplicate_id_while_running(llama_daemon):
    """The refusal is not tied to the running request's id: that request still ends exactly once."""
    client = llama_daemon.client()
    client.send({"op": "generate", "id": "dup", "prompt": "Once", "max_tokens": 200, "ignore_eos": True})
    client.send({"op": "generate", "id": "dup", "prompt": "Twice", "max_tokens": 5})
    refusal = first_error(client, None)
    assert refusal["code"] == "duplicate_id" and refusal["rejected_id"] == "dup", refusal
    for op in ({"op": "ping"}, {"op": "status"}, {"op": "cancel", "target": "other"}):
        client.send({**op, "id": "dup"})
        refusal = first_error(client, None)
        assert refusal["code"] == "duplicate_id" and refusal["rejected_id"] == "dup", (op, refusal)
    assert client.cancel("dup")["found"] is True
    tokens, done = collect(client.events("dup"))
    assert done["event"] == "done" and done["finish_reason"] == "cancelled", done
    assert_nothing_after(client, "dup")
    assert_still_serving(llama_daemon)


def test_no_traceback_reaches_the_client_or_kills_the_daemon(llama_daemon):
    client = llama_daemon.client()
    for frame in (b"\x00" * 10, b"{}", b'{"op": null, "id": null}', b"null", b"1e999999"):
        client.send_raw(frame)
        error = first_error(client, None)
        assert "Traceback" not in error["message"]
    assert llama_daemon.process.poll() is None
    assert_still_serving(llama_daemon)


def test_lone_surrogate_prompt_is_refused_and_the_worker_lives_on(llama_daemon):
    before = llama_worker(llama_daemon)
    client = llama_daemon.client(timeout_s=20)
    # json.dumps cannot write a lone surrogate as UTF-8: the frame is built by hand.
    client.send_raw(b'{"op":"generate","id":"s1","prompt":"\\udc00"}')
    error = first_error(client, "s1")
    assert error["code"] == "invalid_request" and "prompt" in error["message"], error
    assert_still_serving(llama_daemon)
    assert llama_worker(llama_daemon) == before


@pytest.mark.parametrize(
    "frame, mentions",
    [
        (b'{"op":"generate","id":"t1","messages":[{"role":"user","content":"a\\ud800"}]}', "messages[0].content"),
        (b'{"op":"generate","id":"t1","prompt":"x","stop":["a","\\udfff"]}', "stop[1]"),
        (b'{"op":"generate","id":"t1","prompt":"x","engine":"\\udc00"}', "engine"),
        (b'{"op":"generate","id":"t1","prompt":"x","max\\udc00":1}', "'max\\udc00'"),
        (b'{"op":"cancel","id":"t1","target":"\\udc00"}', "target"),
        pytest.param(b'{"op":"ping","id":"t1","x\\udc00":1}', "'x\\udc00'"),
    ],
)
def test_lone_surrogates_anywhere_are_refused_naming_the_field(llama_daemon, frame, mentions):
    client = llama_daemon.client(timeout_s=20)
    client.send_raw(frame)
    error = first_error(client, "t1")
    assert error["code"] == "invalid_request" and error["message"].startswith(mentions + ": "), error


def test_an_id_that_is_not_text_is_refused_without_an_id(llama_daemon):
    client = llama_daemon.client(timeout_s=10)
    client.send_raw(b'{"op":"ping","id":"\\udc00"}')
    error = first_error(client, None)
    assert error["code"] == "invalid_request" and error["message"].startswith("id: "), error
