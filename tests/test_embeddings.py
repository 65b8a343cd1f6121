"""Embeddings: the embed op over pyzmq (fake engine: mechanics) and POST /v1/embeddings through the official
`openai` client on the default model loaded in embedding mode (the real llama.cpp worker)."""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
from pathlib import Path
from typing import Any, Iterator

import httpx
import ollama
import openai
import pytest

from supervisor.planning.measure.model_facts import read_model_facts

from .conftest import CLI, LLAMA, Daemon, assert_nothing_after, fake_engine, wait_until
from .test_cancel import request_ends
from .test_http import base_url, http_settings, openai_client

EMBEDDER = {**LLAMA, "embedding": True}
TEXTS = ["The cat sat on the mat.", "Embeddings map text to vectors.", "The cat sat on the mat.", "zero"]


@pytest.fixture(scope="module")
def daemon(shared_state: dict[str, Path]) -> Iterator[Daemon]:
    """The default model three times: in embedding mode (emb; raw: last-token pooling, not normalized) and
    generating (gen)."""
    engines = {
        "emb": EMBEDDER,
        "gen": {**LLAMA, "priority": 20},
        "raw": {**EMBEDDER, "priority": 30, "pooling": "last", "normalize": False},
    }
    started = Daemon(shared_state, engines, **http_settings())
    try:
        yield started.start(timeout=300.0)
    finally:
        started.stop()


def norm(vector: list[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in vector))


def worker(daemon: Daemon, name: str) -> tuple[int, int]:
    first = daemon.engine(name)["workers"][0]
    return first["pid"], first["restarts"]


# --- the real engine, through the openai client ----------------------------------------------


def test_embeddings_are_deterministic_sized_normalized_and_counted(daemon, shared_state):
    client = openai_client(daemon, timeout=300.0)
    reply = client.embeddings.create(model="emb", input=TEXTS)
    vectors = [item.embedding for item in reply.data]
    assert [item.index for item in reply.data] == list(range(len(TEXTS)))
    assert len(vectors[0]) == read_model_facts(shared_state["model"]).n_embd  # the model's own n_embd
    assert all(len(v) == len(vectors[0]) for v in vectors)
    assert vectors[0] == vectors[2]  # the same text in one batch
    assert vectors[0] != vectors[1]
    assert all(abs(norm(v) - 1.0) < 1e-5 for v in vectors)
    again = client.embeddings.create(model="emb", input=TEXTS[0]).data[0].embedding
    single_tokens = client.embeddings.create(model="emb", input=TEXTS[1]).usage.prompt_tokens
    assert reply.usage.prompt_tokens == reply.usage.total_tokens
    assert reply.usage.prompt_tokens > single_tokens > 0
    # The same text alone: llama.cpp's numerics depend on what shares the decode (kernel paths and sums over
    # the cache cells in use), so a batch matches the singles closely, not bit for bit (llama-cpp-python's
    # own Llama.embed differs the same way); the same input in the same batch shape is exact (above).
    assert max(abs(a - b) for a, b in zip(again, vectors[0])) < 1e-2
    assert math.fsum(a * b for a, b in zip(again, vectors[0])) > 0.999


def test_a_batch_equals_the_singles_and_base64_decodes_to_the_floats(daemon):
    client = openai_client(daemon, timeout=300.0)
    batch = [item.embedding for item in client.embeddings.create(model="emb", input=TEXTS[:2]).data]
    singles = [client.embeddings.create(model="emb", input=[text]).data[0].embedding for text in TEXTS[:2]]
    for together, alone in zip(batch, singles):
        assert math.fsum(a * b for a, b in zip(together, alone)) > 0.999
        assert max(abs(a - b) for a, b in zip(together, alone)) < 1e-2
    raw = client.with_options().embeddings.with_raw_response.create(
        model="emb", input=TEXTS[:2], encoding_format="base64"
    )
    encoded = raw.http_response.json()["data"]
    for item, floats in zip(encoded, batch):
        blob = base64.b64decode(item["embedding"])
        decoded = struct.unpack(f"<{len(blob) // 4}f", blob)
        assert len(decoded) == len(floats)
        assert max(abs(a - b) for a, b in zip(decoded, floats)) < 1e-6  # float32 of the same vector


def test_pooling_and_normalize_are_the_engines_own(daemon):
    client = openai_client(daemon, timeout=300.0)
    mean = client.embeddings.create(model="emb", input=TEXTS[1]).data[0].embedding
    last = client.embeddings.create(model="raw", input=TEXTS[1]).data[0].embedding
    assert abs(norm(last) - 1.0) > 1e-3  # not normalized
    assert math.fsum(a * b for a, b in zip(mean, last)) / norm(last) < 0.999  # another pooling, another direction
    assert daemon.engine("raw")["workers"][0]["model"]["pooling"] == "last"
    assert daemon.engine("emb")["workers"][0]["model"]["pooling"] == "mean"  # the model has none of its own


def test_token_arrays_embed_like_their_text(daemon):
    client = openai_client(daemon, timeout=300.0)
    one = client.embeddings.create(model="emb", input=[[2, 818, 5866], [2, 818]])
    assert len(one.data) == 2 and one.usage.prompt_tokens == 5
    single = client.embeddings.create(model="emb", input=[2, 818, 5866])  # one token array is one input
    assert len(single.data) == 1 and single.usage.prompt_tokens == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["a", ""]}, "input[1]"),
        ({"input": ["a", "b", 3]}, "input[2]"),
        ({"input": [[1, 2], "b"]}, "input[1]"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "dimensions": 7}, "dimensions"),
        ({"input": [[1, 2**40]]}, "input[0][1]"),
    ],
)
def test_bad_input_is_invalid_request_naming_the_field_and_the_engine_serves_on(daemon, body, param):
    before = worker(daemon, "emb")
    client = openai_client(daemon, timeout=120.0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/embeddings", body={"model": "emb", **body}, cast_to=object)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["code"] == "invalid_request" and error["param"] == param, error
    assert worker(daemon, "emb") == before
    assert len(client.embeddings.create(model="emb", input="still here").data) == 1


def test_a_generating_engine_asked_to_embed_and_an_embedding_engine_asked_to_generate_refuse(daemon):
    client = openai_client(daemon, timeout=120.0)
    before = worker(daemon, "gen"), worker(daemon, "emb")
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="gen", input="hello")
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "input"
    assert "gen" in caught.value.message and "embeddings" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="emb", prompt="Once upon", max_tokens=2)
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "prompt"
    # Unpinned, each goes where it can be served.
    assert client.completions.create(model="default", prompt="Once upon", max_tokens=2).choices[0].text is not None
    assert len(client.embeddings.create(model="default", input="hello").data) == 1
    assert (worker(daemon, "gen"), worker(daemon, "emb")) == before


# --- mechanics, with the fake engine over pyzmq ---------------------------------------------------


def embed_daemon(make_daemon: Any, tmp_path: Path, **options: Any) -> tuple[Daemon, Path]:
    config, control = fake_engine(tmp_path, "fe", **options)
    return make_daemon({"fe": {**config, "embedding": True}}), control


def test_the_embed_op_answers_in_input_order_with_one_terminal_event(make_daemon, tmp_path):
    daemon, _ = embed_daemon(make_daemon, tmp_path, embed_delay_s=0.01)
    client = daemon.client()
    ids = [client.send({"op": "embed", "input": [f"text {i}", "same"]}) for i in range(3)]
    ends = {rid: client.receive(rid) for rid in ids}
    for rid in ids:
        assert ends[rid]["event"] == "embeddings", ends[rid]
        assert_nothing_after(client, rid)
    first = ends[ids[0]]["embeddings"]
    assert [len(v) for v in first] == [8, 8] and first[0] != first[1]
    assert all(ends[rid]["embeddings"][1] == first[1] for rid in ids)  # "same": the same vector each time
    assert ends[ids[0]]["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    refused = client.embed([])
    assert refused["event"] == "error" and refused["code"] == "invalid_request"
    assert refused["message"].startswith("input:")
    refused = client.embed(["a", 1])
    assert refused["code"] == "invalid_request" and refused["message"].startswith("input[1]:")
    refused = client.embed("a", temperature=0.5)
    assert refused["code"] == "invalid_request" and refused["message"].startswith("temperature:")
    refused = client.complete("hello", max_tokens=2)
    assert refused["event"] == "error" and refused["code"] == "unsupported_parameter", refused


def test_a_crash_mid_embed_is_retried_once_then_gets_exactly_one_error(make_daemon, tmp_path):
    daemon, control = embed_daemon(make_daemon, tmp_path, crash_after_tokens=1)
    client = daemon.client()
    rid = client.send({"op": "embed", "input": ["a", "b", "c"]})
    end = client.receive(rid, timeout_s=60.0)
    assert end["event"] == "error" and end["code"] == "engine_failed", end
    assert_nothing_after(client, rid)
    control.write_text('{"crash_after_tokens": null}')
    wait_until(lambda: daemon.engine("fe")["state"] == "ready", 60.0, "the worker back after its crashes")
    again = client.embed(["a", "b", "c"])
    assert again["event"] == "embeddings" and len(again["embeddings"]) == 3


def test_cancelling_an_embed_ends_it_once(make_daemon, tmp_path):
    daemon, _ = embed_daemon(make_daemon, tmp_path, embed_delay_s=0.2)
    client = daemon.client()
    rid = client.send({"op": "embed", "input": [str(i) for i in range(50)]})
    wait_until(lambda: daemon.engine("fe")["in_flight"] == 1, 30.0, "the embed running")
    assert client.cancel(rid)["found"] is True
    end = client.receive(rid, timeout_s=30.0)
    assert end["event"] == "done" and end["finish_reason"] == "cancelled", end
    assert_nothing_after(client, rid)


def test_the_embed_command_prints_the_vectors(make_daemon, tmp_path):
    daemon, _ = embed_daemon(make_daemon, tmp_path)
    run = subprocess.run(
        [*CLI, "--config", str(daemon.config_path), "embed", "one", "two words"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert len(reply["embeddings"]) == 2 and reply["usage"]["prompt_tokens"] == 3 and reply["engine"] == "fe"


def test_a_long_embed_that_keeps_decoding_is_not_taken_for_a_stalled_worker(make_daemon, tmp_path):
    """No tokens flow during an embed; its decodes' progress (heartbeat phase "embedding") keeps it alive."""
    config, _ = fake_engine(tmp_path, "fe", embed_delay_s=0.5)
    daemon = make_daemon(
        {"fe": {**config, "embedding": True}},
        heartbeat_interval_s=0.2,
        supervision={"stall_timeout_s": 1.5, "probe_interval_s": 0},
    )
    before = worker(daemon, "fe")
    reply = daemon.client().embed([str(i) for i in range(8)])  # 4 s, well past the stall timeout
    assert reply["event"] == "embeddings" and len(reply["embeddings"]) == 8, reply
    assert worker(daemon, "fe") == before


# --- Ollama's /api/embed and /api/embeddings, through the ollama client, on the same path ------------


def close(vector: list[float], other: list[float]) -> bool:
    return len(vector) == len(other) and all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(vector, other)
    )


def test_ollama_embed_gives_the_vectors_of_v1_embeddings(daemon):
    api = ollama.Client(host=base_url(daemon), timeout=300.0)
    reply = api.embed(model="emb", input=TEXTS[:2])
    openai_vectors = [
        item.embedding for item in openai_client(daemon).embeddings.create(model="emb", input=TEXTS[:2]).data
    ]
    # the openai client asks for base64 (float32) and decodes it; JSON floats here: equal to float32 precision
    assert all(close(list(v), w) for v, w in zip(reply.embeddings, openai_vectors, strict=True))
    assert reply.model == "emb" and reply.prompt_eval_count > 0 and reply.total_duration > 0
    single = api.embed(model="emb", input=TEXTS[0]).embeddings
    assert len(single) == 1 and close(list(single[0]), openai_vectors[0])
    legacy = api.embeddings(model="emb", prompt=TEXTS[0]).embedding  # the older endpoint: one prompt, one vector
    assert close(list(legacy), openai_vectors[0])


@pytest.mark.parametrize(
    "body, named",
    [
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input[1]"),
        ({"input": "x", "dimensions": 3}, "dimensions"),
        ({"input": "x", "frobnicate": 1}, "frobnicate"),
    ],
)
def test_ollama_embed_bad_input_names_the_field_and_the_engine_serves_on(daemon, body, named):
    api = ollama.Client(host=base_url(daemon), timeout=60.0)
    before = worker(daemon, "emb")
    with pytest.raises(ollama.ResponseError) as caught:
        api._request_raw("POST", "/api/embed", json={"model": "emb", **body})
    assert caught.value.status_code == 400 and named in caught.value.error, caught.value.error
    assert worker(daemon, "emb") == before
    with pytest.raises(ollama.ResponseError) as unknown:
        api.embed(model="nosuch", input="x")
    assert unknown.value.status_code == 404
    assert len(api.embed(model="emb", input="still here").embeddings) == 1


@pytest.mark.parametrize("path", ["/v1/embeddings", "/api/embed"])
def test_an_http_client_that_goes_away_cancels_its_embed(make_daemon, tmp_path, path):
    config, _ = fake_engine(tmp_path, "fe", embed_delay_s=0.2)
    daemon = make_daemon({"fe": {**config, "embedding": True}}, **http_settings())
    before = worker(daemon, "fe")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(base_url(daemon) + path, json={"model": "fe", "input": [str(i) for i in range(50)]}, timeout=1.0)
    ends = wait_until(lambda: [e for e in request_ends(daemon) if e.get("finish_reason")], 30, "the embed's end")
    assert ends[-1]["finish_reason"] == "cancelled", ends  # not run on to its 50 inputs (10 s)
    assert worker(daemon, "fe") == before and daemon.engine("fe")["in_flight"] == 0
    assert "Traceback" not in daemon.log_text()
