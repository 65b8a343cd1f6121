"""Capabilities: what each engine can do beyond plain sampling (its worker's ready message says), and
requests that need one routed only to engines that have it; driven in-process (tests/core_harness.py)."""

from __future__ import annotations

import pytest

from supervisor.core.errors import Refused
from workers import protocol as p
from workers.protocol import messages as m

from .core_harness import Core

FAKE = {"kind": "fake"}


def two_engines() -> Core:
    """ "plain" (preferred) lists nothing; "able" lists the penalties."""
    core = Core({"plain": {**FAKE, "priority": 1}, "able": {**FAKE, "priority": 2}})
    core.supervisor.start(core.now)
    core.bring_up("plain")
    core.bring_up("able", (m.CAP_PENALTIES,))
    return core


def test_a_request_needing_a_capability_goes_to_the_engine_that_has_it_and_others_to_the_preferred_one():
    core = two_engines()
    core.submit("penalized", repeat_penalty=1.3)
    core.submit("plain_one")
    assert core.current("able").id == "penalized" and core.current("plain").id == "plain_one"
    (generate,) = core.effects.worker_messages("able.1", m.Generate.TYPE)
    assert generate["params"]["repeat_penalty"] == 1.3
    assert core.engine("able").describe(core.now)["capabilities"] == [m.CAP_PENALTIES]


def test_none_able_is_unsupported_parameter_naming_the_field_and_the_engines_considered():
    core = two_engines()
    with pytest.raises(Refused) as refused:
        core.submit("biased", logit_bias={"5": 1.0})
    assert refused.value.code == p.ErrorCode.UNSUPPORTED_PARAMETER
    message = refused.value.message
    assert message.startswith("logit_bias: needs an engine with 'logit_bias'")
    assert "plain (none)" in message and "able (penalties)" in message
    assert core.engines.refused_unrouted == {p.ErrorCode.UNSUPPORTED_PARAMETER: 1}  # counted, nothing dispatched
    assert core.effects.worker_messages("plain.1", m.Generate.TYPE) == []
    assert core.effects.worker_messages("able.1", m.Generate.TYPE) == []


def test_a_pinned_engine_without_the_capability_refuses_and_a_default_value_needs_nothing():
    core = two_engines()
    with pytest.raises(Refused) as refused:
        core.submit("pinned", engine="plain", presence_penalty=0.5)
    assert refused.value.code == p.ErrorCode.UNSUPPORTED_PARAMETER
    assert refused.value.message.startswith("presence_penalty: ") and "plain (none)" in refused.value.message
    assert core.engine("plain").stats.refused == {p.ErrorCode.UNSUPPORTED_PARAMETER: 1}
    core.submit("defaults", engine="plain", repeat_penalty=1.0, presence_penalty=0, logit_bias={})
    assert core.current("plain").id == "defaults"


def test_an_engine_not_yet_ready_takes_the_request_and_refuses_it_once_its_worker_says_it_cannot():
    core = Core({"a": FAKE})
    core.supervisor.start(core.now)
    core.submit("waits", frequency_penalty=1.0)  # what "a" can do is not known yet: it may
    core.bring_up("a", ())
    (error,) = core.terminal("waits")
    assert error["event"] == "error" and error["code"] == p.ErrorCode.UNSUPPORTED_PARAMETER
    assert error["message"].startswith("frequency_penalty: ") and "a (none)" in error["message"]
    assert core.effects.worker_messages("a.1", m.Generate.TYPE) == []  # the worker never saw it
    core.submit("next")
    assert core.current("a").id == "next"  # and serves on


def test_a_sampling_field_needs_its_capability_only_away_from_its_default():
    assert m.Sampling().needs() == {}
    assert m.Sampling(penalty_last_n=0, min_p=0.2).needs() == {}
    assert m.Sampling(frequency_penalty=0.1, presence_penalty=0.2, logit_bias={"1": 2.0}).needs() == {
        m.CAP_PENALTIES: "presence_penalty",
        m.CAP_LOGIT_BIAS: "logit_bias",
    }
