"""Tool calling: the parser of each format (malformed output stays content, never an exception), the
mechanics through the official `openai` client and the ZeroMQ client against a daemon whose fake engine
writes canned outputs (streamed deltas assemble into the whole answer, exactly one terminal event), bad
tools refused naming the field with the worker unharmed, and the real llama.cpp worker on the default model:
a forced call's arguments validate against the function's parameters, streamed and whole, and a tool result
goes back into the conversation."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import ollama
import openai
import pytest

from supervisor.node.envs import env_python
from workers.protocol.tool_calls import CallStart, call_schema, parse_tool_calls

from .conftest import CLI, LLAMA, Daemon
from .test_http import base_url, http_settings, openai_client

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
ADD_PARAMETERS = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_PARAMETERS},
    },
    {"type": "function", "function": {"name": "add", "description": "Adds two integers", "parameters": ADD_PARAMETERS}},
]
NAMES = ["get_weather", "add"]
REPO = Path(__file__).resolve().parent.parent
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PARIS = {"city": "Paris", "unit": "celsius"}

# --- the parser ---------------------------------------------------------------------------------------

WELL_FORMED = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>', 1),
    (
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "add", '
        '"arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>',
        2,
    ),  # fmt: skip
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', 1),  # the end tag is a stop token for some
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}', 1),  # Llama 3.x
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {}}', 2),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]', 1),  # Mistral
    ('[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {}}]', 2),  # plain
]
MALFORMED = [
    '<tool_call>{"name": "add", "arguments": {"a": 1',  # cut off
    '{"name": "subtract", "arguments": {}}',  # not one of the tools
    '{"name": "add", "arguments": [1, 2]}',  # arguments not an object
    '{"name": "add", "arguments": "not json"}',
    '{"name": "add", "arguments": {}, "mood": "happy"}',  # not a call's fields
    '<tool_call>{"name": "add", "arguments": {}}</tool_call> and then some words',
    "[TOOL_CALLS] not json",
    '{"a": 1}',
    "just an answer",
    "",
    "[" * 10000,  # too deep for the JSON decoder
    "<tool_call></tool_call>",
]


@pytest.mark.parametrize("text, count", WELL_FORMED)
def test_each_format_parses_into_calls_to_known_functions(text, count):
    calls = parse_tool_calls(text, NAMES)
    assert calls is not None and len(calls) == count
    for call in calls:
        assert set(call) == {"name", "arguments"} and call["name"] in NAMES and isinstance(call["arguments"], dict)


def test_arguments_read_as_given_whichever_key_and_form():
    assert parse_tool_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}', NAMES) == [
        {"name": "add", "arguments": {"a": 1, "b": 2}}
    ]
    assert parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 5}"}</tool_call>', NAMES) == [
        {"name": "add", "arguments": {"a": 5}}
    ]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_output_is_not_a_call_and_raises_nothing(text):
    assert parse_tool_calls(text, NAMES) is None


def feed_all(start: CallStart, pieces: list[str]) -> tuple[str, str]:
    return "".join(start.feed(piece) for piece in pieces), start.held()


def test_text_before_a_call_streams_and_the_call_is_held_even_when_its_marker_is_split():
    assert feed_all(CallStart(), ["Let me ", "check. <tool", "_call>{", '"name": 1}']) == (
        "Let me check. ",
        '<tool_call>{"name": 1}',
    )
    assert feed_all(CallStart(), ["[TOOL", "_CALLS] ["]) == ("", "[TOOL_CALLS] [")
    # A tail that looked like a marker and was not is released: nothing is lost.
    assert feed_all(CallStart(), ["a <to", "y> b"]) == ("a <toy> b", "")
    assert feed_all(CallStart(), ["  ", '{"na', 'me"']) == ("", '  {"name"')  # JSON first: held whole
    assert feed_all(CallStart(whole=True), ["any", "thing"]) == ("", "anything")


def test_the_forced_call_schema_is_any_of_the_tools_or_only_the_named_one():
    schema = call_schema(TOOLS, "required")
    assert [v["properties"]["name"]["const"] for v in schema["anyOf"]] == NAMES
    named = call_schema(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert named["properties"]["arguments"] == ADD_PARAMETERS and named["required"] == ["name", "arguments"]
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, call_schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}}))  # fmt: skip


# --- the mechanics, on the fake engine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake(shared_state: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    control = tmp_path_factory.mktemp("tools") / "control.json"
    engines = {"f": {"kind": "fake", "priority": 10, "options": {"control_file": str(control)}}}
    started = Daemon(shared_state, engines, **http_settings())
    try:
        yield started.start(), control
    finally:
        started.stop()


def say(control: Path, reply: str, chunk: int = 3) -> None:
    """What the fake engine generates next (pieces of ``chunk`` characters, one token each)."""
    control.write_text(json.dumps({"reply": reply, "reply_chunk": chunk}))


def ask(client: openai.OpenAI, stream: bool, **fields: Any) -> Any:
    request = {"model": "f", "messages": ASK, "tools": TOOLS, "max_tokens": 500, **fields}
    return client.chat.completions.create(stream=stream, **request)


def assembled(chunks: Any) -> tuple[str, list[dict[str, Any]], list[str]]:
    """A stream's content, its tool calls put together from their deltas as a client does, its finish reasons."""
    content, calls, reasons = [], {}, []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content.append(choice.delta.content or "")
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        if choice.finish_reason:
            reasons.append(choice.finish_reason)
    return "".join(content), [calls[i] for i in sorted(calls)], reasons


@pytest.mark.parametrize("text, count", WELL_FORMED)
def test_each_format_becomes_tool_calls_whole_and_streamed_alike(fake, text, count):
    daemon, control = fake
    say(control, "Sure. " + text if text.startswith("<tool_call>") else text)
    client = openai_client(daemon)
    whole = ask(client, False).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert len(whole.message.tool_calls) == count
    expected = parse_tool_calls(text, NAMES)
    for call, parsed in zip(whole.message.tool_calls, expected):
        assert call.type == "function" and call.id.startswith("call_")
        assert (call.function.name, json.loads(call.function.arguments)) == (parsed["name"], parsed["arguments"])
    content, calls, reasons = assembled(ask(client, True))
    assert reasons == ["tool_calls"]  # exactly one end
    assert content == (whole.message.content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls
    ]


def test_text_before_a_hermes_call_is_content_and_streams_before_it(fake):
    daemon, control = fake
    say(control, 'Let me look that up. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    client = openai_client(daemon)
    whole = ask(client, False).choices[0]
    assert whole.message.content == "Let me look that up. " and whole.finish_reason == "tool_calls"
    assert assembled(ask(client, True))[0] == "Let me look that up. "


@pytest.mark.parametrize("text", [t for t in MALFORMED if t and len(t) < 200])
def test_malformed_calls_are_plain_content_whole_and_streamed(fake, text):
    daemon, control = fake
    say(control, text)
    client = openai_client(daemon)
    whole = ask(client, False).choices[0]
    assert (whole.message.content, whole.message.tool_calls, whole.finish_reason) == (text, None, "stop")
    assert assembled(ask(client, True)) == (text, [], ["stop"])


def test_parallel_tool_calls_false_keeps_the_first_call_and_tool_choice_none_parses_nothing(fake):
    daemon, control = fake
    text = '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {}}]'
    say(control, text)
    client = openai_client(daemon)
    calls = ask(client, False, parallel_tool_calls=False).choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["add"]
    none = ask(client, False, tool_choice="none").choices[0]
    assert (none.message.content, none.message.tool_calls, none.finish_reason) == (text, None, "stop")


def test_the_zeromq_done_event_carries_the_calls_with_arguments_as_an_object(fake):
    daemon, control = fake
    say(control, '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    with daemon.client() as client:
        for stream in (True, False):
            events = list(client.generate(messages=ASK, tools=TOOLS, stream=stream))
            assert [e["event"] for e in events] == ["done"]  # the call's text is never a token
            done = events[0]
            assert done["finish_reason"] == "tool_calls"
            (call,) = done["tool_calls"]
            assert call["type"] == "function" and call["id"].startswith("call_")
            assert call["function"] == {"name": "add", "arguments": {"a": 1, "b": 2}}


def test_the_cli_sends_tools_and_prints_the_calls(fake):
    daemon, control = fake
    say(control, '{"name": "add", "arguments": {"a": 1, "b": 2}}')
    tools, choice = json.dumps(TOOLS), json.dumps({"type": "function", "function": {"name": "add"}})
    for extra in (["--tool-choice", "required"], ["--tool-choice", choice]):
        result = subprocess.run(
            [*CLI, "--config", str(daemon.config_path), "generate", "--chat", "Add", "--tools", tools, *extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == 'add {"a": 1, "b": 2}' and "[tool_calls:" in result.stderr


def test_a_tool_result_round_trip_is_accepted_in_openai_form(fake):
    daemon, control = fake
    say(control, "It is 21 degrees in Paris.")
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(PARIS)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    answer = openai_client(daemon).chat.completions.create(model="f", messages=history, tools=TOOLS)
    assert answer.choices[0].message.content == "It is 21 degrees in Paris."


BAD_TOOLS = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"type": 7}}}}}]},
        "tools[0].function.parameters.properties.x.type",
    ),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "unknown"}}},
        "tool_choice.function.name",
    ),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),  # nothing to choose from
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    (
        {
            "tools": TOOLS,
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "add", "arguments": "[1]"}}],
                }
            ],  # fmt: skip
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
    ({"messages": [{"role": "tool", "tool_call_id": "c", "content": "42"}]}, "messages[0]"),  # no tools
]


def worker(daemon: Daemon, engine: str) -> tuple[int, int]:
    found = daemon.engine(engine)["workers"][0]
    return found["pid"], found["restarts"]


@pytest.mark.parametrize("fields, param", BAD_TOOLS)
def test_bad_tools_are_invalid_requests_naming_the_field_and_the_worker_serves_on(fake, fields, param):
    daemon, control = fake
    before = worker(daemon, "f")
    client = openai_client(daemon)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": "f", "messages": ASK, **fields})
    assert caught.value.code == "invalid_request" and caught.value.param == param, caught.value.body
    say(control, "still here")
    assert client.chat.completions.create(model="f", messages=ASK).choices[0].message.content == "still here"
    assert worker(daemon, "f") == before


def test_zeromq_clients_get_the_same_invalid_request_naming_the_field(fake):
    daemon, _control = fake
    nameless = [{"type": "function", "function": {"parameters": {"type": "object"}}}]
    history = [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}]}]
    with daemon.client() as client:
        for fields, starts in (
            ({"messages": ASK, "tools": nameless}, "tools[0].function.name: "),
            ({"prompt": "x", "tools": TOOLS}, "tools: "),  # a prompt has no template to render them
            ({"messages": history, "tools": TOOLS}, "messages[0].tool_calls[0].function.arguments: must be an object"),
        ):
            (event,) = list(client.generate(**fields))
            assert event["event"] == "error" and event["code"] == "invalid_request", event
            assert event["message"].startswith(starts), event


def test_an_engine_without_the_tools_capability_is_not_sent_tools(make_daemon):
    daemon = make_daemon({"plain": {"kind": "fake", "options": {"capabilities": ["grammar"]}}}, **http_settings())
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(daemon).chat.completions.create(model="plain", messages=ASK, tools=TOOLS)
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "tools"


def test_completions_take_no_tools(fake):
    daemon, _control = fake
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(daemon).completions.create(model="f", prompt="x", extra_body={"tools": TOOLS})
    assert caught.value.param == "tools"


# --- the real llama.cpp worker, on the default model ----------------------------------------------------


@pytest.fixture(scope="module")
def llama(shared_state: dict[str, Path]) -> Iterator[Daemon]:
    started = Daemon(shared_state, {"llama": LLAMA}, **http_settings())
    try:
        yield started.start()
    finally:
        started.stop()


def forced(client: openai.OpenAI, stream: bool, tool_choice: Any, max_tokens: int = 120) -> Any:
    return client.chat.completions.create(
        model="default", messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=max_tokens, temperature=0,
        stream=stream,
    )  # fmt: skip


PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "add": ADD_PARAMETERS}


@pytest.mark.real_engine
def test_required_gives_a_call_whose_arguments_validate_whole_and_streamed(llama):
    client = openai_client(llama, timeout=300.0)
    whole = forced(client, False, "required").choices[0]
    assert whole.finish_reason == "tool_calls", whole
    (call,) = whole.message.tool_calls
    assert call.function.name in PARAMETERS
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    content, calls, reasons = assembled(forced(client, True, "required"))
    assert reasons == ["tool_calls"] and content == "" and len(calls) == 1
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMETERS[calls[0]["name"]])


@pytest.mark.real_engine
def test_a_named_function_is_the_one_called(llama):
    client = openai_client(llama, timeout=300.0)
    for name in ("add", "get_weather"):
        choice = forced(client, False, {"type": "function", "function": {"name": name}}).choices[0]
        (call,) = choice.message.tool_calls
        assert call.function.name == name
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[name])


@pytest.mark.real_engine
def test_a_tool_result_round_trip_gets_a_normal_answer(llama):
    client = openai_client(llama, timeout=300.0)
    call = forced(client, False, {"type": "function", "function": {"name": "get_weather"}}).choices[0]
    (tool_call,) = call.message.tool_calls
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [tool_call.model_dump()]},
        {"role": "tool", "tool_call_id": tool_call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    answer = client.chat.completions.create(
        model="default", messages=history, tools=TOOLS, tool_choice="none", max_tokens=20, temperature=0
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


@pytest.mark.real_engine
@pytest.mark.parametrize("fields, param", BAD_TOOLS[:5])
def test_bad_tools_leave_the_llama_worker_unharmed(llama, fields, param):
    before = worker(llama, "llama")
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(llama, timeout=120.0).chat.completions.create(
            **{"model": "default", "messages": ASK, "max_tokens": 3, **fields}
        )
    assert caught.value.code == "invalid_request" and caught.value.param == param, caught.value.body
    assert worker(llama, "llama") == before


# A Hermes-style template in the way Hugging Face tool templates read tools and calls (arguments an object).
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function | tojson }}{% endfor %}</tools>"
    "<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>'
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
RENDER = """
import json, sys
from llama_cpp import llama_chat_format
from workers.llamacpp.engine import _JinjaTemplate
template, messages, tools, choice = json.loads(sys.stdin.read())
chat = _JinjaTemplate(llama_chat_format.Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>"))
print(json.dumps(chat.format(messages, tools, choice)[0]))
"""


def render(state: dict[str, Path], template: str, messages: list[dict[str, Any]], choice: Any = None) -> str:
    """The prompt the llama.cpp worker's Jinja template makes (run in the engine's own environment)."""
    python = env_python(state["envs_dir"] / "llamacpp")
    given = json.dumps([template, messages, TOOLS, choice])
    out = subprocess.run(
        [str(python), "-c", RENDER], input=given, capture_output=True, text=True, cwd=REPO, check=True, timeout=120
    )
    return json.loads(out.stdout)


HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}}],
    },  # fmt: skip
    {"role": "tool", "tool_call_id": "c1", "content": "21 degrees"},
]


@pytest.mark.real_engine
def test_a_template_that_reads_tools_renders_them_and_the_calls_and_one_that_does_not_gets_the_fallback(
    shared_state,
):
    prompt = render(shared_state, TOOL_TEMPLATE, HISTORY)
    assert '<tools>{"name": "get_weather"' in prompt and '"parameters": {"type": "object"' in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert "<|im_start|>tool\n21 degrees" in prompt
    assert "<tools>" not in render(shared_state, TOOL_TEMPLATE, HISTORY, "none")  # none: the model is not told
    plain = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    fallback = render(shared_state, plain, HISTORY)
    assert fallback.startswith("[system] You can call the following tools") and '"name": "add"' in fallback
    assert '[assistant] {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in fallback
    assert "[user] Tool result (c1): 21 degrees" in fallback


@pytest.mark.real_engine
def test_auto_renders_the_tools_without_a_grammar_and_answers_content_or_valid_calls(llama):
    client = openai_client(llama, timeout=300.0)
    for stream in (False, True):
        if stream:
            content, calls, reasons = assembled(forced(client, True, "auto", 24))
        else:
            choice = forced(client, False, "auto", 24).choices[0]
            content, reasons = choice.message.content or "", [choice.finish_reason]
            calls = [
                {"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls or []
            ]
        assert len(reasons) == 1 and reasons[0] in ("stop", "length", "tool_calls")
        assert (reasons[0] == "tool_calls") == bool(calls) and (content or calls)
        for call in calls:  # whatever a base model says unconstrained: a call only when it names a tool
            assert call["name"] in PARAMETERS and isinstance(json.loads(call["arguments"]), dict)


# --- Ollama's /api/chat: tools in, calls out (arguments an object), history back in ---------------------


def test_ollama_chat_tools_become_tool_calls_whole_and_streamed(fake):
    daemon, control = fake
    say(control, '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    api = ollama.Client(host=base_url(daemon), timeout=30.0)
    whole = api.chat(model="f", messages=ASK, tools=TOOLS, stream=False)
    (call,) = whole.message.tool_calls
    assert (call.function.name, dict(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert whole.done_reason == "tool_calls" and not whole.message.content
    parts = list(api.chat(model="f", messages=ASK, tools=TOOLS, stream=True))
    streamed = [c for part in parts for c in part.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == [("get_weather", {"city": "Paris"})]
    assert [part.done for part in parts].count(True) == 1 and parts[-1].done
    # the call and its result go back as history, Ollama's way (tool_name, arguments an object)
    say(control, "It is sunny in Paris.")
    history = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": '{"sky": "clear"}'},
    ]  # fmt: skip
    answer = api.chat(model="f", messages=history, tools=TOOLS, stream=False)
    assert answer.message.content == "It is sunny in Paris." and not answer.message.tool_calls


def test_ollama_chat_bad_tools_name_the_field(fake):
    daemon, _ = fake
    api = ollama.Client(host=base_url(daemon), timeout=30.0)
    body = {"model": "f", "messages": ASK, "tools": [{"type": "function", "function": {"parameters": {}}}]}
    with pytest.raises(ollama.ResponseError) as caught:
        api._request_raw("POST", "/api/chat", json={**body, "stream": False})
    assert caught.value.status_code == 400 and "tools[0].function.name" in caught.value.error
