"""Structured output through the official `openai` client on the default model (the real llama.cpp worker):
a JSON schema's output validates against it, streamed and whole; a schema the engine cannot follow and a
grammar that does not parse are the request's invalid_request, the worker unharmed."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import openai
import pytest

from supervisor.node.envs import env_python

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


# llama-cpp-python's own completion, its grammar in the sampler chain ahead of greedy: every candidate checked.
GRAMMAR_FIRST = """
import json, sys
from llama_cpp import Llama, LlamaGrammar
model, prompt, schema = sys.argv[1], sys.argv[2], sys.argv[3]
llm = Llama(model, n_ctx=2048, n_threads=2, verbose=False)
grammar = LlamaGrammar.from_json_schema(schema, verbose=False)
out = llm.create_completion(prompt, max_tokens=80, temperature=0, grammar=grammar)
print(json.dumps(out["choices"][0]["text"]))
"""


def test_greedy_under_a_grammar_is_the_text_of_the_grammar_run_over_every_candidate(shared_state):
    """The worker asks the grammar only about the chain's pick (constrained.py); greedy must pick the same tokens
    as llama-cpp-python, whose grammar sampler filters every candidate before greedy.  A fresh worker, as the
    script's: a context that evaluated other prompts first may tip a near tie between two allowed tokens."""
    prompt = "A pet, as JSON:"
    schema = json.dumps(PET)
    script = subprocess.run(
        [
            str(env_python(shared_state["envs_dir"] / "llamacpp")),
            "-c",
            GRAMMAR_FIRST,
            str(shared_state["model"]),
            prompt,
            schema,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    expected = json.loads(script.stdout.strip().splitlines()[-1])
    daemon = Daemon(shared_state, {"llama": LLAMA}, **http_settings()).start()
    try:
        ours = openai_client(daemon, timeout=300.0).completions.create(
            model="default",
            prompt=prompt,
            max_tokens=80,
            temperature=0,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}}},
        )
    finally:
        daemon.stop()
    assert ours.choices[0].text == expected


def test_schema_output_validates_on_parallel_sequences(shared_state):
    """The batch loop samples each sequence with its own grammar: two at once both validate."""
    started = Daemon(shared_state, {"llama": {**LLAMA, "parallel": 2}}, **http_settings())
    started.start()
    try:
        client = openai_client(started, timeout=300.0)

        def ask(seed: int) -> str:
            reply = client.chat.completions.create(
                model="default", messages=ASK, max_tokens=200, temperature=0.8, seed=seed, response_format=pet_format()
            )
            return reply.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(ask, (1, 2)))
        for answer in answers:
            jsonschema.validate(json.loads(answer), PET)
    finally:
        started.stop()
