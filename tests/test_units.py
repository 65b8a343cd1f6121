"""Pure pieces: text assembly, request validation, lifecycle table, latency windows, backoff."""

from __future__ import annotations

import random

import pytest

from supervisor.core.latency import LatencyWindow
from supervisor.core.lifecycle import ALLOWED, IllegalTransition, WorkerState as SlotState, check_transition
from supervisor.core.policy import Backoff, retry_can_help
from supervisor.core.validate import InvalidMessage, parse_generate
from workers.protocol import ExitCode
from workers.textstream import TextAssembler


def feed_all(assembler: TextAssembler, pieces: list[bytes]) -> str:
    return "".join(assembler.feed(piece) for piece in pieces) + assembler.flush()


def test_text_passes_through_without_stop_strings():
    assert feed_all(TextAssembler(), [b"Hel", b"lo", b" world"]) == "Hello world"


def test_multibyte_character_split_across_tokens_is_reassembled():
    snowman = "☃".encode()
    assembler = TextAssembler()
    assert assembler.feed(snowman[:1]) == ""
    assert assembler.feed(snowman[1:]) == "☃"


def test_stop_string_across_tokens_is_cut_and_never_emitted():
    assembler = TextAssembler(["END"])
    out = [assembler.feed(b"abc E"), assembler.feed(b"N"), assembler.feed(b"D more")]
    assert "".join(out) == "abc " and assembler.stopped
    assert assembler.feed(b"later") == "" and assembler.flush() == ""


def test_held_back_text_is_released_when_it_cannot_become_a_stop_string():
    assembler = TextAssembler(["END"])
    assert assembler.feed(b"x E") == "x "
    assert assembler.feed(b"ast") == "East"
    assert not assembler.stopped


def test_earliest_of_several_stop_strings_wins():
    assert feed_all(TextAssembler(["zz", "b"]), [b"a b zz"]) == "a "


def test_generate_defaults_and_ranges():
    params = parse_generate({"op": "generate", "id": "x", "prompt": "hi"}, 1000)
    assert params.stream is True and params.sampling.max_tokens == 256 and params.sampling.seed is None
    with pytest.raises(InvalidMessage, match="max_tokens"):
        parse_generate({"op": "generate", "id": "x", "prompt": "hi", "max_tokens": 101}, 100)
    params = parse_generate({"op": "generate", "id": "x", "prompt": "hi", "stop": "\n", "temperature": 0}, 1000)
    assert params.sampling.stop == ("\n",) and params.sampling.temperature == 0.0


def test_every_state_has_a_row_and_illegal_transitions_raise():
    assert set(ALLOWED) == set(SlotState)
    check_transition(SlotState.LOADING, SlotState.READY)
    with pytest.raises(IllegalTransition, match="stopped -> ready"):
        check_transition(SlotState.STOPPED, SlotState.READY)
    with pytest.raises(IllegalTransition):
        check_transition(SlotState.STOPPING, SlotState.READY)


def test_latency_percentiles_nearest_rank_over_the_time_window():
    window = LatencyWindow(window_s=60.0)
    assert window.percentile(0.0, 50) is None
    for value in range(1, 101):
        window.add(float(value), float(value))  # one sample a second
    now = 100.0
    # Samples older than 60 s are gone: 40..100 remain.
    assert window.summary(now)["samples"] == 61
    assert window.percentile(now, 50) == 70.0 and window.percentile(now, 100) == 100.0
    assert window.percentile(1000.0, 50) is None


def test_backoff_grows_is_capped_jittered_and_resets_after_stable_running():
    backoff = Backoff(base_s=1.0, cap_s=8.0, stable_after_s=60.0)
    rng = random.Random(1)
    delays = [backoff.next_delay(ready_since=None, now=0.0, rng=rng) for _ in range(6)]
    for n, delay in enumerate(delays):
        nominal = min(8.0, 2.0**n)
        assert nominal / 2 <= delay <= nominal
    # Healthy for the stable period: back to the base delay.
    assert backoff.next_delay(ready_since=100.0, now=161.0, rng=rng) <= 1.0


def test_exit_codes_that_retrying_cannot_fix():
    assert retry_can_help(ExitCode.MODEL_ERROR)  # the file can be fixed: the circuit decides
    assert not retry_can_help(ExitCode.UNAVAILABLE)
    assert not retry_can_help(ExitCode.PROTOCOL_MISMATCH)
    assert retry_can_help(ExitCode.CRASH) and retry_can_help(-9)


# --- supervision policies, driven with a fake clock ---------------------------------

from supervisor.core.policy import Circuit, CircuitBreaker, LatencySwitch, LatencyVerdict  # noqa: E402

OK = LatencyVerdict(breaching=False, recovered=True)
SLOW = LatencyVerdict(breaching=True, recovered=False)
MEH = LatencyVerdict(breaching=False, recovered=False)


def test_circuit_opens_after_threshold_failures_within_the_window_only():
    breaker = CircuitBreaker(threshold=3, window_s=10.0, open_s=5.0)
    assert not breaker.record_failure(0.0, "engine_failed", "crash")
    assert not breaker.record_failure(1.0, "engine_failed", "crash")
    # The first failure left the window: two in the window, still closed (a flap, not a loop).
    assert not breaker.record_failure(10.5, "engine_failed", "crash")
    assert breaker.allows_traffic
    assert breaker.record_failure(11.0, "engine_failed", "crash")
    assert breaker.state is Circuit.OPEN and not breaker.allows_traffic


def test_a_load_between_failures_does_not_clear_the_count_of_a_closed_circuit():
    breaker = CircuitBreaker(threshold=2, window_s=10.0, open_s=5.0)
    assert not breaker.record_failure(0.0, "engine_failed", "upstream answered 429")
    assert not breaker.record_success()  # the worker loaded again: nothing to close
    assert breaker.record_failure(1.0, "engine_failed", "upstream answered 429")
    assert breaker.state is Circuit.OPEN


def test_half_open_probe_closes_on_success_and_reopens_on_failure():
    breaker = CircuitBreaker(threshold=1, window_s=10.0, open_s=5.0)
    breaker.record_failure(0.0, "model_load_failed", "bad file")
    assert not breaker.probe_due(4.9)
    assert breaker.probe_due(5.0) and breaker.state is Circuit.HALF_OPEN
    assert not breaker.probe_due(5.1), "one probe per open period"
    assert breaker.record_failure(6.0, "model_load_failed", "still bad")  # probe failed
    assert breaker.state is Circuit.OPEN and not breaker.probe_due(10.9) and breaker.probe_due(11.0)
    assert breaker.record_success() and breaker.state is Circuit.CLOSED and breaker.reason == ""


def test_latency_switch_moves_after_the_breach_window_and_not_before():
    switch = LatencySwitch(min_dwell_s=5.0, breach_for_s=3.0)
    order, healthy = ["a", "b"], {"a", "b"}
    assert switch.decide(0.0, order, healthy, {"a": OK, "b": OK}) == ("a", "start")
    assert switch.decide(6.0, order, healthy, {"a": SLOW, "b": OK}) == ("a", "")
    assert switch.decide(8.9, order, healthy, {"a": SLOW, "b": OK}) == ("a", "")
    active, why = switch.decide(9.0, order, healthy, {"a": SLOW, "b": OK})
    assert active == "b" and "latency" in why


def test_latency_switch_respects_dwell_and_hysteresis_then_returns():
    switch = LatencySwitch(min_dwell_s=5.0, breach_for_s=0.0)
    order, healthy = ["a", "b"], {"a", "b"}
    switch.decide(0.0, order, healthy, {"a": OK, "b": OK})
    assert switch.decide(1.0, order, healthy, {"a": SLOW, "b": OK})[0] == "b", "the start is not a switch"
    # b breaches too soon after the switch: the dwell time holds traffic on b.
    assert switch.decide(2.0, order, healthy, {"a": OK, "b": SLOW})[0] == "b"
    # a is no longer breaching but not yet under objective x hysteresis: stay.
    assert switch.decide(20.0, order, healthy, {"a": MEH, "b": OK})[0] == "b"
    # a recovered, but the dwell time since the switch is not over: stay.
    switch2 = LatencySwitch(min_dwell_s=5.0, breach_for_s=0.0)
    switch2.decide(0.0, order, healthy, {"a": OK, "b": OK})
    switch2.decide(5.0, order, healthy, {"a": SLOW, "b": OK})
    assert switch2.decide(7.0, order, healthy, {"a": OK, "b": OK})[0] == "b"
    active, why = switch2.decide(10.0, order, healthy, {"a": OK, "b": OK})
    assert active == "a" and "recovered" in why


def test_preferred_engine_not_left_for_latency_returns_once_healthy_without_samples():
    switch = LatencySwitch(min_dwell_s=5.0, breach_for_s=0.0)
    order = ["a", "b"]
    # At start only b is ready; a becomes ready a moment later and takes over at once.
    assert switch.decide(0.0, order, {"b"}, {}) == ("b", "start")
    active, why = switch.decide(0.1, order, {"a", "b"}, {"a": MEH, "b": OK})
    assert active == "a" and "healthy again" in why
    # a crashes: b at once; a back: after the dwell time, no latency verdict needed.
    assert switch.decide(10.0, order, {"b"}, {})[0] == "b"
    assert switch.decide(12.0, order, {"a", "b"}, {"a": MEH, "b": OK})[0] == "b"
    assert switch.decide(15.0, order, {"a", "b"}, {"a": MEH, "b": OK})[0] == "a"


def test_latency_switch_never_moves_to_an_engine_that_is_also_slow_or_unhealthy():
    switch = LatencySwitch(min_dwell_s=0.0, breach_for_s=0.0)
    switch.decide(0.0, ["a", "b"], {"a", "b"}, {"a": OK, "b": OK})
    assert switch.decide(1.0, ["a", "b"], {"a", "b"}, {"a": SLOW, "b": SLOW})[0] == "a"
    assert switch.decide(2.0, ["a", "b"], {"a"}, {"a": SLOW, "b": OK})[0] == "a"
    # The active engine becoming unhealthy moves traffic at once, dwell or not.
    assert switch.decide(2.1, ["a", "b"], {"b"}, {"a": OK, "b": OK}) == ("b", "active engine unhealthy")
