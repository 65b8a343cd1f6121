"""Pure pieces: text assembly, request validation, lifecycle table, latency windows, backoff."""

from __future__ import annotations

import random

import pytest

from supervisor.health import LatencyWindow
from supervisor.lifecycle import ALLOWED, IllegalTransition, SlotState, check_transition
from supervisor.policy import Backoff, retry_can_help
from supervisor.requests import InvalidMessage, parse_generate
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
    assert params.stream is True and params.sampling["max_tokens"] == 256 and params.sampling["seed"] is None
    with pytest.raises(InvalidMessage, match="max_tokens"):
        parse_generate({"op": "generate", "id": "x", "prompt": "hi", "max_tokens": 101}, 100)
    params = parse_generate({"op": "generate", "id": "x", "prompt": "hi", "stop": "\n", "temperature": 0}, 1000)
    assert params.sampling["stop"] == ["\n"] and params.sampling["temperature"] == 0.0


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
