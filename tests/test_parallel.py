"""One worker generating for several requests at once (`parallel`), end to end
through a real daemon and a real worker process (the fake engine's batch mode)."""

from __future__ import annotations

from workers import protocol as p
from workers.fake import WORDS

from .conftest import assert_nothing_after, collect, fake_engine


def test_a_parallel_worker_serves_requests_together_and_a_cancel_ends_only_its_own(make_daemon, tmp_path):
    engine, _ = fake_engine(tmp_path, "f", token_delay_s=0.05)
    daemon = make_daemon({"f": {**engine, "parallel": 3}})
    assert daemon.engine("f")["slots"] == 3
    client = daemon.client(timeout_s=30)
    ids = [client.send({"op": p.OP_GENERATE, "prompt": "hi", "max_tokens": 40}) for _ in range(4)]
    status = daemon.wait_for(lambda s: s["engines"][0]["in_flight"] == 3)
    assert status["engines"][0]["queue_depth"] == 1  # the fourth waits for a free slot
    assert status["engines"][0]["workers"][0]["requests"] == ids[:3]
    assert client.cancel(ids[1])["found"] is True
    ends = {}
    for rid in ids:
        tokens, ends[rid] = collect(client.events(rid))
        assert len(tokens) == ends[rid]["usage"]["completion_tokens"], rid
        words = "".join(t["text"] for t in tokens).split()
        assert words == (WORDS * 5)[: len(words)], rid  # each stream is its own, from its start
        assert_nothing_after(client, rid)
    assert ends[ids[1]]["finish_reason"] == p.FINISH_CANCELLED and ends[ids[1]]["usage"]["completion_tokens"] < 40
    for rid in (ids[0], ids[2], ids[3]):
        assert ends[rid]["finish_reason"] == p.FINISH_LENGTH and ends[rid]["usage"]["completion_tokens"] == 40
    assert {ends[rid]["worker"] for rid in ids} == {"f.1"}


def test_a_parallel_worker_that_crashes_fails_or_retries_every_request_it_ran(make_daemon, tmp_path):
    engine, control = fake_engine(tmp_path, "f", token_delay_s=0.02)
    daemon = make_daemon({"f": {**engine, "parallel": 2}})
    client = daemon.client(timeout_s=30)
    control.write_text('{"crash_after_tokens": 5}')
    ids = [client.send({"op": p.OP_GENERATE, "prompt": "hi", "max_tokens": 20}) for _ in range(2)]
    streams = [collect(client.events(rid)) for rid in ids]
    assert [end["code"] for _, end in streams] == [p.ErrorCode.ENGINE_FAILED] * 2  # tokens were streamed: no retry
    # The first got 5 tokens before the crash, the second joined a step later; each failure counts what its client got.
    assert [end["usage"]["completion_tokens"] for _, end in streams] == [len(tokens) for tokens, _ in streams]
    assert streams[0][1]["usage"]["completion_tokens"] == 5
    control.write_text("{}")
    daemon.wait_for(
        lambda s: s["engines"][0]["state"] == "ready" and s["engines"][0]["workers"][0]["id"] == "f.2", timeout=60
    )
    assert client.complete(prompt="hi", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_a_client_keeping_requests_outstanding_takes_their_events_as_they_come(make_daemon, tmp_path):
    """Client.receive_any: a pipelining caller reads every request's events off one connection, in arrival order,
    the ones an earlier receive(id) set aside included."""
    engine, _ = fake_engine(tmp_path, "f", token_delay_s=0.01)
    daemon = make_daemon({"f": {**engine, "parallel": 4}})
    client = daemon.client(timeout_s=30)
    ids = [client.send({"op": p.OP_GENERATE, "prompt": "hi", "max_tokens": 3 + i}) for i in range(6)]
    first_of_last = client.receive(ids[-1])  # the others' events that came before it wait in the client
    assert first_of_last["event"] in (p.EVENT_TOKEN, p.EVENT_DONE)
    seen: dict[str, list[str]] = {rid: [] for rid in ids}
    seen[ids[-1]].append(first_of_last["event"])
    while any(not events or events[-1] not in p.TERMINAL_EVENTS for events in seen.values()):
        event = client.receive_any()
        seen[event["id"]].append(event["event"])
    for index, rid in enumerate(ids):
        assert seen[rid] == [p.EVENT_TOKEN] * (3 + index) + [p.EVENT_DONE], rid  # stream true: every token, one end
        assert_nothing_after(client, rid)
