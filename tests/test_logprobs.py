"""Log probabilities and n choices through the official `openai` client (and the ZeroMQ protocol) on the
default model (the real llama.cpp worker): one engine with one slot (the single-request loop) and one with
two (sequences of one context), so both of llama.cpp's generation paths report logprobs, and n = 2 has an
engine to run on and one that refuses it."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from .conftest import LLAMA, Daemon, collect, fake_engine
from .test_http import http_settings, openai_client

pytestmark = pytest.mark.real_engine

PROMPT = "The capital of France is"
ENGINES = ("one", "two")  # one slot, two slots


@pytest.fixture(scope="module")
def daemon(shared_state: dict[str, Path]) -> Iterator[Daemon]:
    engines = {"one": {**LLAMA, "n_ctx": 512}, "two": {**LLAMA, "n_ctx": 512, "parallel": 2, "priority": 20}}
    started = Daemon(shared_state, engines, **http_settings())
    try:
        yield started.start()
    finally:
        started.stop()


def check_legacy(logprobs: Any, top: int, greedy: bool) -> None:
    """Completions' logprobs: one row per token, each chosen logprob a log-probability, ``top`` alternatives
    whose probabilities sum to at most 1, the greedy choice the most likely one, offsets where tokens begin."""
    tokens, chosen, alternatives, offsets = (
        logprobs.tokens,
        logprobs.token_logprobs,
        logprobs.top_logprobs,
        logprobs.text_offset,
    )
    assert tokens and len(tokens) == len(chosen) == len(alternatives) == len(offsets)
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    for token, logprob, top_of in zip(tokens, chosen, alternatives):
        assert logprob <= 0
        assert len(top_of) == top  # a token whose text two ids share would count once: not in this prompt
        assert sum(math.exp(v) for v in top_of.values()) <= 1 + 1e-6
        if greedy:
            assert max(top_of.values()) == pytest.approx(logprob, abs=1e-5) and top_of[token] == pytest.approx(logprob)


@pytest.mark.parametrize("engine", ENGINES)
def test_completions_logprobs_have_openai_shape_and_greedy_picks_the_top_token(daemon, engine):
    client = openai_client(daemon, timeout=300.0)
    warm(client, engine, PROMPT)
    whole = client.completions.create(model=engine, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    choice = whole.choices[0]
    check_legacy(choice.logprobs, 3, greedy=True)
    assert "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.tokens) == whole.usage.completion_tokens  # no stop string: every token is sent
    streamed = list(
        client.completions.create(model=engine, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, stream=True)
    )
    rows = [(t, lp) for c in streamed if c.choices and c.choices[0].logprobs for t, lp in _rows(c.choices[0].logprobs)]
    assert [t for t, _ in rows] == choice.logprobs.tokens
    assert [lp for _, lp in rows] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-3)
    offsets = [o for c in streamed if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == choice.logprobs.text_offset  # counted across the stream's chunks


def warm(client: openai.OpenAI, engine: str, prompt: str) -> None:
    """One request of the prompt first: the single-request loop then reuses its cache for all but the
    last prompt token in every request compared (a fresh evaluation differs in the last bits, which can
    turn a near tie of a base model's greedy choice)."""
    client.completions.create(model=engine, prompt=prompt, max_tokens=1)


def _rows(logprobs: Any) -> list[tuple[str, float]]:
    return list(zip(logprobs.tokens, logprobs.token_logprobs))


def test_chat_logprobs_whole_and_streamed_agree(daemon):
    client = openai_client(daemon, timeout=300.0)
    # on "two": a sequence's cache is cleared after each request, every request evaluates the prompt afresh
    ask = {"model": "two", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}
    whole = client.chat.completions.create(**ask, temperature=0, logprobs=True, top_logprobs=4)
    content = whole.choices[0].logprobs.content
    assert content and "".join(entry.token for entry in content) == whole.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert len(entry.top_logprobs) == 4 and sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely token is the one chosen
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    chunks = list(client.chat.completions.create(**ask, temperature=0, logprobs=True, top_logprobs=4, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-3)
    only_chosen = client.chat.completions.create(**ask, temperature=0, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in only_chosen.choices[0].logprobs.content)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_seed_gives_the_same_text_and_logprobs_and_asking_for_them_changes_no_text(daemon, engine):
    client = openai_client(daemon, timeout=300.0)
    ask = {"model": engine, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9, "seed": 11}
    warm(client, engine, ask["prompt"])
    first = client.completions.create(**ask, logprobs=2).choices[0]
    again = client.completions.create(**ask, logprobs=2).choices[0]
    plain = client.completions.create(**ask).choices[0]
    assert first.text == again.text == plain.text and plain.logprobs is None
    assert first.logprobs.tokens == again.logprobs.tokens
    assert first.logprobs.token_logprobs == pytest.approx(again.logprobs.token_logprobs, abs=1e-3)
    check_legacy(first.logprobs, 2, greedy=False)


def test_the_protocol_sends_each_tokens_entry_with_its_text_even_when_held_back_for_a_stop_string(daemon):
    with daemon.client(timeout_s=300.0) as client:
        # " Paris" then "." is what the model continues with: a stop string that spans tokens holds text back
        tokens, done = collect(
            client.generate(PROMPT, engine="one", max_tokens=10, temperature=0, stop=[". "], logprobs=True, stream=True)
        )
    assert done["event"] == "done"
    entries = [entry for event in tokens for entry in event["logprobs"]]
    assert all(len(event["logprobs"]) == event.get("tokens", 1) for event in tokens)
    assert "".join(entry["token"] for entry in entries).startswith("".join(event["text"] for event in tokens))
    assert all(entry["top_logprobs"] == [] and entry["logprob"] <= 0 for entry in entries)


def test_n_choices_run_on_an_engine_with_the_slots_seeded_in_turn(daemon):
    client = openai_client(daemon, timeout=300.0)
    ask = {"prompt": "My favourite word is", "max_tokens": 6, "temperature": 1.0, "seed": 21, "logprobs": 0}
    both = client.completions.create(model="two", n=2, **ask)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in both.choices)
    assert both.usage.prompt_tokens > 0  # counted once, as OpenAI counts it
    texts = [c.text for c in both.choices]
    assert texts[0] != texts[1]  # seeds 21 and 22
    assert [c.text for c in client.completions.create(model="two", n=2, **ask).choices] == texts  # same seed
    # Choice i samples with seed + i: its first token is what a request alone with that seed draws first (a
    # batch of two computes with other kernels' rounding than one, so later tokens may drift).
    for choice, seed in zip(both.choices, (21, 22)):
        alone = client.completions.create(model="two", **{**ask, "seed": seed}).choices[0]
        assert alone.logprobs.tokens[0] == choice.logprobs.tokens[0]
    chosen_for_default = client.completions.create(model="default", n=2, **ask)  # "one" has 1 slot: "two" serves
    assert [c.text for c in chosen_for_default.choices] == texts
    stream = client.completions.create(model="two", n=2, stream=True, **ask)
    streamed = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == texts
    chat = client.chat.completions.create(
        model="two", n=2, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, seed=3
    )
    assert [c.index for c in chat.choices] == [0, 1] and all(c.message.role == "assistant" for c in chat.choices)


def test_n_above_an_engines_slots_is_refused_naming_the_engines_considered(daemon):
    client = openai_client(daemon)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="one", prompt="Hi", n=2, max_tokens=2)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == "n" and error["code"] == "unsupported_parameter"
    assert "one (1 slot)" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="default", prompt="Hi", n=3, max_tokens=2)
    assert "one (1 slot)" in caught.value.body["message"] and "two (2 slots)" in caught.value.body["message"]


def test_a_client_gone_cancels_every_choice(daemon):
    before = daemon.engine("two")["cancelled"]
    client = openai_client(daemon, timeout=300.0)
    stream = client.completions.create(model="two", prompt="Once upon a time", n=2, max_tokens=400, stream=True)
    next(iter(stream))
    stream.close()
    daemon.wait_for(lambda s: next(e for e in s["engines"] if e["name"] == "two")["cancelled"] == before + 2, 60)
    assert daemon.engine("two")["in_flight"] == 0


@pytest.mark.parametrize(
    "kind, fields, param",
    [
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
        ("chat", {"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ("chat", {"logprobs": "yes"}, "logprobs"),
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"logprobs": True}, "logprobs"),
        ("completions", {"n": 0}, "n"),
        ("completions", {"n": "2"}, "n"),
        ("completions", {"n": 2, "best_of": 3}, "best_of"),
    ],
)
def test_bad_logprobs_or_n_is_invalid_naming_the_field_and_the_workers_serve_on(daemon, kind, fields, param):
    before = {name: daemon.engine(name)["workers"][0] for name in ENGINES}
    client = openai_client(daemon)
    with pytest.raises(openai.BadRequestError) as caught:
        if kind == "chat":
            client.chat.completions.create(
                model="two", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body=fields
            )
        else:
            client.completions.create(model="two", prompt="Hi", max_tokens=2, extra_body=fields)
    assert caught.value.body["param"] == param and caught.value.body["code"] == "invalid_request"
    time.sleep(0.2)
    for name in ENGINES:
        after = daemon.engine(name)["workers"][0]
        assert (after["pid"], after["restarts"]) == (before[name]["pid"], before[name]["restarts"])


def test_entries_travel_with_the_tokens_an_event_holds_and_an_engine_without_logprobs_refuses(make_daemon, tmp_path):
    """Mechanics on the fake engine: an event holding three tokens carries three entries; not streamed, done
    has them all; an engine that does not list the capability gets no such request."""
    config, _ = fake_engine(tmp_path, tokens_per_event=3)
    without, _ = fake_engine(tmp_path, "g", priority=20, capabilities=[])
    daemon = make_daemon({"f": config, "g": without})
    with daemon.client() as client:
        tokens, done = collect(client.generate("hi", engine="f", max_tokens=7, logprobs=True, top_logprobs=2))
        assert [len(event["logprobs"]) for event in tokens] == [3, 3, 1]
        for event in tokens:
            assert "".join(entry["token"] for entry in event["logprobs"]) == event["text"]
            assert all(len(entry["top_logprobs"]) == 2 for entry in event["logprobs"])
        whole = client.complete("hi", engine="f", max_tokens=7, logprobs=True)
        assert len(whole["logprobs"]) == 7 and "".join(e["token"] for e in whole["logprobs"]) == whole["text"]
        plain = client.complete("hi", engine="f", max_tokens=2)
        assert "logprobs" not in plain
        plain_tokens, _ = collect(client.generate("hi", engine="f", max_tokens=4))
        assert plain_tokens and all("logprobs" not in event for event in plain_tokens)
        _, refused = collect(client.generate("hi", engine="g", max_tokens=2, logprobs=True))
    assert refused["code"] == "unsupported_parameter" and refused["message"].startswith("logprobs:")
