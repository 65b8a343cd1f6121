"""Structured output through the official `openai` client on the default model (the real llama.cpp worker):
a JSON schema's output validates against it, streamed and whole; a schema the engine cannot follow and a
grammar that does not parse are the request's invalid_request, the worker unharmed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import openai
import pytest

from .conftest import LLAMA, Daemon
from .test_http import http_settings, openai_client

pytestmark = pytest.mark.real_engine

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "kind": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"age": {"type": "integer"}, "city": {"type": "string", "maxLength": 20}},
            "required": ["age", "city"],
        },
    },
    "required": ["name", "kind", "tags", "owner"],
}
ASK = [{"role": "user", "content": "Describe a pet as JSON."}]


@pytest.fixture(scope="module")
def daemon(shared_state: dict[str, Path]) -> Iterator[Daemon]:
    started = Daemon(shared_state, {"llama": LLAMA}, **http_settings())
    try:
        yield started.start()
    finally:
        started.stop()


def pet_format() -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}


def test_a_json_schema_output_validates_whole_and_streamed(daemon):
    client = openai_client(daemon, timeout=300.0)
    whole = client.chat.completions.create(
        model="default", messages=ASK, max_tokens=200, temperature=0, response_format=pet_format()
    )
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].message.content), PET)
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="default",
            messages=ASK,
            max_tokens=200,
            temperature=0.9,
            seed=5,
            response_format=pet_format(),
            stream=True,
        )
        if chunk.choices
    ]
    jsonschema.validate(json.loads("".join(pieces)), PET)
    json_object = client.completions.create(
        model="default",
        prompt="A JSON object:",
        max_tokens=60,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},  # llama-server's extension to completions
    )
    assert isinstance(json.loads(json_object.choices[0].text), dict)
    grammar = client.completions.create(
        model="default", prompt="Yes or no?", max_tokens=5, extra_body={"grammar": 'root ::= "yes" | "no"'}
    )
    assert grammar.choices[0].text in ("yes", "no")


@pytest.mark.parametrize(
    "fields, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
            "response_format.json_schema.schema",
        ),
        ({"extra_body": {"grammar": "root ::= undefined-rule"}}, "grammar"),
        ({"extra_body": {"grammar": 'start ::= "a"'}}, "grammar"),  # no root
    ],
)
def test_a_schema_or_grammar_the_engine_cannot_follow_is_invalid_and_the_worker_serves_on(daemon, fields, param):
    before = daemon.engine("llama")["workers"][0]
    client = openai_client(daemon, timeout=120.0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="default", messages=ASK, max_tokens=5, **fields)
    assert caught.value.code == "invalid_request" and caught.value.param == param, caught.value.body
    after = daemon.engine("llama")["workers"][0]
    assert (after["pid"], after["restarts"]) == (before["pid"], before["restarts"])
    reply = client.chat.completions.create(model="default", messages=ASK, max_tokens=3, temperature=0)
    assert reply.choices[0].message.content
