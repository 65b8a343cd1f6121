"""Client message validation and the wire format's text handling: pure functions, no processes."""

from __future__ import annotations

import json

import pytest

from workers.protocol.messages import Sampling
from supervisor.core.validate import (
    InvalidMessage,
    check_bare,
    message_id,
    message_op,
    parse_cancel,
    parse_generate,
    reply_id,
)
from workers.protocol import DecodeError, ErrorCode, decode, encode, invalid_text_path

LONE = "\udc00"  # what json.loads makes of the escape "\udc00"


def refusal(function, *args) -> InvalidMessage:
    """The InvalidMessage a call raises; its message must be encodable as it stands."""
    with pytest.raises(InvalidMessage) as caught:
        function(*args)
    error = caught.value
    error.message.encode("utf-8")
    assert "\n" not in error.message
    return error


def generate(**fields):
    return {"op": "generate", "id": "g1", **fields}


# --- invalid_text_path ---------------------------------------------------------


def test_valid_text_at_any_depth_has_no_path():
    message = {
        "op": "generate",
        "id": "x",
        "prompt": "héllo ☃ 😀",
        "messages": [{"role": "user", "content": "ok"}],
        "n": [1, None, 2.5],
    }
    assert invalid_text_path(message) is None
    # A surrogate pair escape is one proper character, not a lone surrogate.
    assert invalid_text_path(json.loads('{"prompt": "\\ud83d\\ude00"}')) is None


@pytest.mark.parametrize(
    "message, path",
    [
        ({"prompt": LONE}, "prompt"),
        ({"messages": [{"role": "user", "content": "a" + LONE}]}, "messages[0].content"),
        ({"stop": ["ok", LONE]}, "stop[1]"),
        ({"engine": LONE}, "engine"),
        ({"target": "\ud800x"}, "target"),
        ({"op": "ping", "x" + LONE: 1}, ascii("x" + LONE)),
        ({"messages": [{"role": "user", "content": "c", LONE: "v"}]}, f"messages[0].{ascii(LONE)}"),
    ],
)
def test_invalid_text_is_named_by_its_path(message, path):
    assert invalid_text_path(message) == path
    path.encode("utf-8")


def test_the_first_invalid_string_in_document_order_is_named():
    assert invalid_text_path({"a": [LONE], LONE: LONE, "c": LONE}) == "a[0]"
    assert invalid_text_path(LONE) == ""


def test_invalid_text_path_does_not_recurse():
    deep: list = [LONE]
    for _ in range(100_000):
        deep = [deep]
    assert invalid_text_path({"x": deep}) == "x" + "[0]" * 100_001


# --- decode and encode -----------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [b"[" * 100_000, b'{"op":"generate","id":"n","prompt":' + b"[" * 100_000, b'{"a":' * 50_000],
    ids=["arrays", "arrays-in-an-object", "objects"],
)
def test_deeply_nested_json_is_a_decode_error(frame):
    with pytest.raises(DecodeError, match="nested too deeply"):
        decode(frame)


def test_moderately_nested_json_still_decodes():
    expected: list = []
    for _ in range(49):
        expected = [expected]
    assert decode(b'{"a":' + b"[" * 50 + b"]" * 50 + b"}") == {"a": expected}


def test_encode_writes_invalid_text_as_ascii_escaped_json():
    frame = encode({"id": "e", "message": "prompt" + LONE, "text": "☃"})
    assert frame.isascii()
    assert json.loads(frame) == {"id": "e", "message": "prompt" + LONE, "text": "☃"}
    assert frame == b'{"id":"e","message":"prompt\\udc00","text":"\\u2603"}'


def test_encode_keeps_valid_text_as_compact_utf8():
    assert encode({"id": "e", "text": "☃ x"}) == '{"id":"e","text":"☃ x"}'.encode("utf-8")


def test_a_lone_surrogate_frame_decodes_and_validation_refuses_it():
    message = decode(b'{"op":"generate","id":"s1","prompt":"\\udc00"}')
    assert message["prompt"] == LONE
    assert reply_id(message) == "s1"
    error = refusal(parse_generate, message, 1000)
    assert error.code == ErrorCode.INVALID_REQUEST and error.message.startswith("prompt:")


# --- invalid text in client messages -------------------------------------------------


@pytest.mark.parametrize(
    "message, named",
    [
        (generate(prompt=LONE), "prompt"),
        (generate(messages=[{"role": "user", "content": LONE}]), "messages[0].content"),
        (generate(prompt="x", stop=["a", "b" + LONE]), "stop[1]"),
        (generate(prompt="x", engine=LONE), "engine"),
        (generate(prompt="x", **{"max" + LONE: 5}), ascii("max" + LONE)),
    ],
)
def test_generate_refuses_invalid_text_naming_the_field(message, named):
    error = refusal(parse_generate, message, 1000)
    assert error.code == ErrorCode.INVALID_REQUEST
    assert error.message.startswith(named + ": ") and "Unicode" in error.message


def test_cancel_and_bare_ops_refuse_invalid_text():
    assert refusal(parse_cancel, {"op": "cancel", "id": "c", "target": LONE}).message.startswith("target: ")
    error = refusal(check_bare, {"op": "ping", "id": "p", LONE: 1})
    assert error.code == ErrorCode.INVALID_REQUEST and error.message.startswith(ascii(LONE) + ": ")


def test_an_id_that_is_not_text_is_refused_and_not_echoed():
    message = {"op": "ping", "id": "a" + LONE}
    error = refusal(message_id, message)
    assert error.code == ErrorCode.INVALID_REQUEST and error.message.startswith("id: ")
    assert reply_id(message) is None


@pytest.mark.parametrize(
    "value, expected", [("r1", "r1"), (42, None), (None, None), (["r1"], None), ("x" * 500, "x" * 500)]
)
def test_reply_id_is_the_id_when_readable(value, expected):
    assert reply_id({"op": "ping", "id": value}) == expected
    assert reply_id({"op": "ping"}) is None


def test_unknown_op_echo_is_short_and_encodable():
    assert "'explode'" in refusal(message_op, {"op": "explode"}).message
    assert refusal(message_op, {"op": "x" + LONE * 10_000}).code == ErrorCode.UNKNOWN_OP
    assert len(refusal(message_op, {"op": "y" * 100_000}).message) < 200
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    assert "an array" in refusal(message_op, {"op": deep}).message
    assert "missing" in refusal(message_op, {"id": "a"}).message


# --- nulls -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["max_tokens", "temperature", "top_p", "top_k", "stop", "ignore_eos", "stream"])
def test_null_is_refused_where_the_protocol_does_not_allow_it(key):
    error = refusal(parse_generate, generate(prompt="x", **{key: None}), 1000)
    assert error.code == ErrorCode.INVALID_REQUEST and error.message.startswith(key + ": ")


def test_null_prompt_or_messages_is_refused():
    assert refusal(parse_generate, generate(prompt=None), 1000).message.startswith("prompt: ")
    assert refusal(parse_generate, generate(messages=None), 1000).message.startswith("messages: ")
    assert refusal(
        parse_generate, generate(prompt=None, messages=[{"role": "user", "content": "x"}]), 1000
    ).message.startswith("prompt: ")


def test_null_seed_deadline_and_engine_mean_their_defaults():
    params = parse_generate(generate(prompt="x", seed=None, deadline_ms=None, engine=None), 1000)
    assert params.sampling.seed is None and params.deadline_ms is None and params.engine is None


def test_defaults_when_fields_are_absent():
    params = parse_generate(generate(prompt="x"), 1000)
    assert params.sampling == Sampling(
        max_tokens=256, temperature=0.8, top_p=0.95, top_k=40, stop=(), seed=None, ignore_eos=False
    )
    assert params.stream is True and params.engine is None and params.deadline_ms is None


# --- unknown fields ------------------------------------------------------------------


@pytest.mark.parametrize("op", ["ping", "status"])
def test_bare_ops_take_only_op_and_id(op):
    check_bare({"op": op, "id": "b"})
    error = refusal(check_bare, {"op": op, "id": "b", "verbose": True})
    assert error.code == ErrorCode.INVALID_REQUEST and error.message == "verbose: unknown field"


def test_cancel_returns_its_target_and_refuses_unknown_fields():
    assert parse_cancel({"op": "cancel", "id": "c", "target": "r1"}) == "r1"
    assert (
        refusal(parse_cancel, {"op": "cancel", "id": "c", "target": "r1", "force": True}).message
        == "force: unknown field"
    )
    assert refusal(parse_cancel, {"op": "cancel", "id": "c"}).message.startswith("target: ")
    assert refusal(parse_cancel, {"op": "cancel", "id": "c", "target": None}).message.startswith("target: ")


def test_unknown_field_names_are_labelled_safely():
    assert refusal(parse_generate, generate(prompt="x", max_token=5), 1000).message == "max_token: unknown field"
    long_name = "k" * 10_000 + "\n"
    message = refusal(parse_generate, generate(prompt="x", **{long_name: 1}), 1000).message
    assert message.startswith("'kkk") and message.endswith("...: unknown field") and len(message) < 200


# --- penalties, min_p, logit_bias -----------------------------------------------------


def test_penalties_min_p_and_logit_bias_pass_and_default_to_off():
    params = parse_generate(
        generate(
            prompt="x",
            repeat_penalty=1.2,
            presence_penalty=-0.5,
            frequency_penalty=2,
            penalty_last_n=-1,
            min_p=0,
            logit_bias={"15": -100, "0007": 2.5},
        ),
        1000,
    )
    sampling = params.sampling
    assert (sampling.repeat_penalty, sampling.presence_penalty, sampling.frequency_penalty) == (1.2, -0.5, 2.0)
    assert sampling.penalty_last_n == -1 and sampling.min_p == 0.0
    assert sampling.logit_bias == {"15": -100.0, "7": 2.5}  # ids written once, as the engine reads them
    defaults = parse_generate(generate(prompt="x", logit_bias=None), 1000).sampling
    assert (defaults.repeat_penalty, defaults.presence_penalty, defaults.frequency_penalty) == (1.0, 0.0, 0.0)
    assert defaults.min_p == 0.05 and defaults.penalty_last_n == 64 and defaults.logit_bias == {}
    assert Sampling.from_wire(sampling.to_wire()) == sampling  # as the worker reads it


@pytest.mark.parametrize(
    "fields, starts",
    [
        ({"repeat_penalty": 0}, "repeat_penalty: must be between 0.01 and 5.0"),
        ({"presence_penalty": 2.5}, "presence_penalty: must be between -2.0 and 2.0"),
        ({"frequency_penalty": "1"}, "frequency_penalty: must be a number"),
        ({"penalty_last_n": -2}, "penalty_last_n: must be between -1 and"),
        ({"min_p": 1.5}, "min_p: must be between 0.0 and 1.0"),
        ({"logit_bias": [1, 2]}, "logit_bias: must be an object"),
        ({"logit_bias": {"abc": 1}}, "logit_bias: key 'abc' is not a token id"),
        ({"logit_bias": {"-1": 1}}, "logit_bias: key '-1' is not a token id"),
        ({"logit_bias": {"12": 101}}, "logit_bias[12]: must be between -100.0 and 100.0"),
        ({"logit_bias": {"12": True}}, "logit_bias[12]: must be a number"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias: at most 1024 tokens"),
    ],
)
def test_bad_penalties_and_biases_are_refused_naming_the_field(fields, starts):
    error = refusal(parse_generate, generate(prompt="x", **fields), 1000)
    assert error.code == ErrorCode.INVALID_REQUEST and error.message.startswith(starts), error.message


# --- structured output ----------------------------------------------------------------


def test_response_format_and_grammar_pass_as_the_engine_reads_them():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    given = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    sampling = parse_generate(generate(prompt="x", response_format=given), 1000).sampling
    assert sampling.response_format == given and sampling.needs() == {"response_format": "response_format"}
    assert Sampling.from_wire(sampling.to_wire()) == sampling
    assert parse_generate(generate(prompt="x", response_format={"type": "text"}), 1000).sampling.needs() == {}
    json_object = parse_generate(generate(prompt="x", response_format={"type": "json_object"}), 1000).sampling
    assert json_object.response_format == {"type": "json_object"}
    grammar = parse_generate(generate(prompt="x", grammar='root ::= "a"'), 1000).sampling
    assert grammar.grammar == 'root ::= "a"' and grammar.needs() == {"grammar": "grammar"}


@pytest.mark.parametrize(
    "fields, starts",
    [
        ({"response_format": "json"}, "response_format: must be an object whose type is text, json_object or"),
        ({"response_format": {"type": "xml"}}, "response_format: must be an object whose type is"),
        ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema: unknown field"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema: must be an object"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
            "response_format.json_schema.schema: must be a JSON schema (an object)",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
            "response_format.json_schema.strict: must be true or false",
        ),
        ({"grammar": ""}, "grammar: must be a string of 1 to 65536 characters"),
        ({"grammar": 5}, "grammar: must be a string"),
        ({"grammar": "root ::= x", "response_format": {"type": "json_object"}}, "grammar: give at most one"),
    ],
)
def test_bad_response_formats_and_grammars_are_refused_naming_the_field(fields, starts):
    error = refusal(parse_generate, generate(prompt="x", **fields), 1000)
    assert error.code == ErrorCode.INVALID_REQUEST and error.message.startswith(starts), error.message
