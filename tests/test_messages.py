"""The typed worker messages (workers/protocol/messages.py): one definition that the daemon, the
client and the workers share, read back with each field's type checked, and the sampling and load
fields that everything else takes from them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from supervisor.cli import _parser
from supervisor.config import EngineConfig
from supervisor.core.reload import LOAD_FIELDS, PLANNED_ONLY
from supervisor.core.validate import InvalidMessage, parse_generate
from supervisor.io.http.openai import PASSED
from workers.protocol import decode, encode
from workers.protocol import messages as m

EXAMPLES = [
    m.Hello(protocol=m.PROTOCOL_VERSION, engine="llamacpp", worker_id="a.1", pid=7, packages={"numpy": "2.0"}),
    m.Loading(progress=0.5, message="loading"),
    m.Ready(model={"n_ctx": 2048}, slots=4),
    m.LoadFailed(code="model_not_found", message="gone", exit_code=65),
    m.Failed(code="engine_failed", message="429", retry_after_s=2.5),
    m.Heartbeat(phase="generating", request_id="r1", tokens=3, last_token_age_ms=1.5),
    m.Token(request_id="r1", text="hé", tokens=2),
    m.Done(request_id="r1", finish_reason="stop", usage=m.Usage(prompt_tokens=3, completion_tokens=4)),
    m.GenerateError(request_id="r1", code="context_overflow", message="too long"),
    m.Load(protocol=m.PROTOCOL_VERSION, spec=m.LoadSpec(model="/m.gguf", n_ctx=512, options={"x": 1})),
    m.Generate.of("r2", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stop=["\n"], seed=1),
    m.Cancel(request_id="r2"),
    m.Shutdown(),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda message: type(message).__name__)
def test_every_message_reads_back_as_it_was_written(message):
    table = m.WORKER_MESSAGES if type(message) in m.WORKER_MESSAGES.values() else m.DAEMON_MESSAGES
    frame = encode(message.to_wire())
    assert json.loads(frame)["type"] == message.TYPE
    assert m.read_message(table, decode(frame)) == message


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"type": "ready", "slots": "4"}, "ready.slots"),
        ({"type": "ready", "slots": True}, "ready.slots"),
        ({"type": "token", "request_id": "r1"}, "token.text"),
        ({"type": "done", "request_id": "r1", "finish_reason": "stop", "usage": {"prompt_tokens": "3"}}, "done.usage"),
        ({"type": "hello", "protocol": 1, "engine": "x", "worker_id": "w", "pid": 1.5}, "hello.pid"),
        ({"type": "surprise"}, "type"),
        ({"type": None}, "type"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_naming_it(raw, named):
    with pytest.raises(m.ProtocolError) as refused:
        m.read_message(m.WORKER_MESSAGES, raw)
    assert str(refused.value).startswith(named)


def test_a_load_of_another_protocol_is_read_without_its_spec():
    load = m.read_message(m.DAEMON_MESSAGES, {"type": "load", "protocol": 99, "spec": {"whatever": 1}})
    assert load == m.Load(protocol=99, spec=None)


def test_the_load_fields_are_the_specs_and_every_one_is_a_setting():
    assert set(m.LOAD_SPEC_FIELDS) - PLANNED_ONLY <= LOAD_FIELDS
    assert LOAD_FIELDS <= set(EngineConfig.model_fields)


def test_every_sampling_field_is_validated_passed_by_http_and_a_generate_flag():
    generate = _parser()._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    flags = {action.dest for action in generate._actions}
    for f in dataclasses.fields(m.Sampling):
        assert f.name in flags, f.name
        assert f.name in PASSED or f.name == "max_tokens", f.name
        with pytest.raises(InvalidMessage) as refused:  # a value of no type the field takes
            parse_generate({"op": "generate", "id": "x", "prompt": "p", f.name: {"no": 1}}, 100)
        assert refused.value.message.startswith(f"{f.name}: ")
    params = parse_generate({"op": "generate", "id": "x", "prompt": "p", "top_k": 3, "stop": "\n"}, 100)
    assert params.sampling == m.Sampling(max_tokens=100, top_k=3, stop=("\n",))
