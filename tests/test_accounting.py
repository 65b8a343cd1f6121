"""Tokens, spend and daily budgets, and the figures the metrics read: driven in-process with a manual clock.

The accounting day is whatever the daemon passes with its tick (its local
date); here the test passes it, and turns it.
"""

from __future__ import annotations

import pytest

from supervisor.core.stats import INTER_TOKEN_BUCKETS_S, TTFT_BUCKETS_S
from supervisor.core.errors import Refused
from workers import protocol as p
from workers.protocol import messages as m

from .core_harness import Core, hello

FAKE = {"kind": "fake"}
# One money unit per generated token, nothing for prompts: costs are easy to follow.
PAID = {**FAKE, "priority": 1, "price_input_per_mtok": 0.0, "price_output_per_mtok": 1_000_000.0, "daily_budget": 5}
DAY_1, DAY_2 = "2031-03-01", "2031-03-02"


def serve(core: Core, engine: str, rid: str, tokens: int, **fields) -> dict:
    core.submit(rid, **fields)
    assert core.current(engine).id == rid
    core.tokens(engine, tokens)
    core.finish_current(engine)
    (end,) = core.terminal(rid)
    return end


def paid_and_free() -> Core:
    core = Core({"paid": PAID, "free": {**FAKE, "priority": 2}}, supervision={"probe_interval_s": 0})
    core.supervisor.start(core.now)
    core.advance(0, day=DAY_1)
    core.bring_up("paid")
    core.bring_up("free")
    return core


def test_tokens_and_cost_are_counted_since_start_and_for_today():
    core = Core({"a": {**FAKE, "price_input_per_mtok": 2.0, "price_output_per_mtok": 10.0}})
    core.supervisor.start(core.now)
    core.advance(0, day=DAY_1)
    core.bring_up("a")
    serve(core, "a", "r1", 4)  # the harness's worker reports 3 prompt tokens
    serve(core, "a", "r2", 6)
    stats = core.engine("a").stats
    assert (stats.tokens.prompt, stats.tokens.completion) == (6, 10)
    assert (stats.tokens_today.prompt, stats.tokens_today.completion) == (6, 10)
    assert stats.spent == pytest.approx((6 * 2.0 + 10 * 10.0) / 1e6) == stats.spent_today
    described = core.engine("a").describe(core.now)
    assert described["tokens"] == {"prompt": 6, "completion": 10, "prompt_today": 6, "completion_today": 10}
    assert described["cost"]["today"] == pytest.approx(0.000112) and described["cost"]["budget_exhausted"] is False
    core.advance(1, day=DAY_2)
    assert (stats.tokens_today.prompt, stats.tokens_today.completion, stats.spent_today) == (0, 0, 0.0)
    assert (stats.tokens.prompt, stats.tokens.completion) == (6, 10)  # since start: kept
    assert core.effects.topics("engine.budget") == []  # no budget, nothing to renew


def test_a_spent_budget_sends_unpinned_traffic_to_the_next_engine_until_the_day_turns():
    core = paid_and_free()
    assert serve(core, "paid", "r1", 3)["engine"] == "paid"
    assert core.effects.topics("engine.budget") == []  # 3 of 5 spent
    # The request that crosses the budget finishes; what waits behind it moves on or, pinned, is refused.
    core.submit("crossing")
    core.submit("waiting")
    core.submit("waiting-pinned", engine="paid")
    core.tokens("paid", 2)
    core.finish_current("paid")
    assert core.terminal("crossing")[0]["event"] == "done"
    (tripped,) = core.effects.topics("engine.budget")
    assert tripped == {"engine": "paid", "exhausted": True, "day": DAY_1, "spent_today": 5.0, "daily_budget": 5.0}
    assert core.current("free").id == "waiting"
    assert core.terminal("waiting-pinned")[0]["code"] == p.ErrorCode.BUDGET_EXHAUSTED
    assert core.engine("paid").describe(core.now)["state"] == p.ErrorCode.BUDGET_EXHAUSTED
    core.finish_current("free")
    assert serve(core, "free", "later", 1)["engine"] == "free"
    with pytest.raises(Refused) as refused:
        core.submit("pinned", engine="paid")
    assert refused.value.code == p.ErrorCode.BUDGET_EXHAUSTED and "daily budget 5 spent" in refused.value.message
    assert core.engine("paid").stats.refused == {p.ErrorCode.BUDGET_EXHAUSTED: 1}
    core.advance(1, day=DAY_1)  # the same day again: nothing changes
    assert len(core.effects.topics("engine.budget")) == 1 and core.engine("paid").budget_exhausted
    core.advance(31, day=DAY_2)  # later than the switch's dwell time, as a day is
    renewed = core.effects.topics("engine.budget")[1]
    assert renewed == {"engine": "paid", "exhausted": False, "day": DAY_2, "spent_today": 0.0, "daily_budget": 5.0}
    assert core.engine("paid").stats.spent == 5.0 and core.engine("paid").stats.spent_today == 0.0
    assert serve(core, "paid", "next-day", 1)["engine"] == "paid"  # the preferred engine serves again


def test_the_first_day_the_daemon_names_does_not_reset_what_was_counted_before_it():
    core = Core({"paid": PAID})
    core.supervisor.start(core.now)
    core.bring_up("paid")
    serve(core, "paid", "r1", 2)  # before the daemon's first tick
    core.advance(0, day=DAY_1)
    assert core.engine("paid").stats.spent_today == 2.0 and core.effects.topics("engine.budget") == []


def test_restarts_are_counted_by_cause():
    core = Core({"a": FAKE}, supervision={"stall_timeout_s": 5, "probe_interval_s": 0})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.exit("a", 1)
    assert core.engine("a").stats.restarts["crash"] == 1
    core.advance(core.engine("a").worker.times.restart_at - core.now + 0.01)
    core.bring_up("a")
    core.submit("stuck")
    core.advance(6)  # no token for longer than the stall timeout: killed as hung
    assert core.effects.named("kill") == ["a.2"]
    core.exit("a", None, cause="killed by SIGKILL")
    core.advance(core.engine("a").worker.times.restart_at - core.now + 0.01)
    engine = core.engine("a")
    core.supervisor.on_hello(engine, hello(1), core.now)
    core.supervisor.on_load_failed(
        engine, m.LoadFailed(code=p.ErrorCode.GPU_OUT_OF_MEMORY, message="out of memory"), core.now
    )
    core.exit("a", 1)
    assert engine.stats.restarts == {"crash": 1, "hang": 1, "probe_failure": 0, "oom": 1, "load_failure": 0}
    assert engine.worker.restarts == 3


def test_latency_histograms_follow_the_clock():
    core = Core({"a": FAKE})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.submit("r")
    core.now += 0.3
    core.tokens("a", 1)  # first token 0.3 s after arrival
    core.now += 0.08
    core.tokens("a", 1, per_event=2)  # two tokens 0.08 s later: two gaps of 0.04 s
    core.now += 0.2
    core.finish_current("a")
    stats = core.engine("a").stats
    assert stats.ttft.count == 1 and stats.ttft.sum == pytest.approx(0.3)
    assert stats.ttft.counts[TTFT_BUCKETS_S.index(0.5)] == 1  # (0.25, 0.5]
    assert stats.inter_token.count == 2 and stats.inter_token.sum == pytest.approx(0.08)
    assert stats.inter_token.counts[INTER_TOKEN_BUCKETS_S.index(0.05)] == 2  # (0.025, 0.05]
    assert stats.e2e.count == 1 and stats.e2e.sum == pytest.approx(0.58)
    assert stats.queue.count == 1 and stats.queue.sum == 0.0
    assert stats.finished == {p.FINISH_STOP: 1, p.FINISH_LENGTH: 0, p.FINISH_CANCELLED: 0}
