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


@pytest.mark.parametrize(
    "frame, code",
    [
        (b"{not json", "malformed_message"),
        (b"\xff\xfe\x00garbage", "malformed_message"),
        (b"[1, 2, 3]", "malformed_message"),
        (b'"just a string"', "malformed_message"),
        (b"", "malformed_message"),
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
