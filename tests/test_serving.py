"""The real daemon, the real llama.cpp worker in its own environment, the real default model."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psutil
import pytest

from .conftest import LLAMA, assert_nothing_after, collect

pytestmark = pytest.mark.real_engine

LONG = {"prompt": "Once upon a time", "ignore_eos": True, "temperature": 0.0, "seed": 7}


def test_streamed_completion(llama_daemon):
    client = llama_daemon.client()
    events = client.generate(prompt="The capital of France is", max_tokens=24, temperature=0.0, seed=1)
    tokens, done = collect(events)
    assert done["event"] == "done", done
    assert done["finish_reason"] in ("stop", "length")
    assert tokens and "".join(t["text"] for t in tokens).strip()
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert 0 < done["usage"]["completion_tokens"] <= 24
    assert done["usage"]["prompt_tokens"] > 0
    assert done["engine"] == "llama" and done["worker"].startswith("llama.")
    timings = done["timings"]
    assert 0 <= timings["queued_ms"] <= timings["ttft_ms"] <= timings["total_ms"]
    assert_nothing_after(client, done["id"])


def test_chat_completion(llama_daemon):
    client = llama_daemon.client()
    messages = [{"role": "user", "content": "Name three colours."}]
    tokens, done = collect(client.generate(messages=messages, max_tokens=24, temperature=0.0, seed=1))
    assert done["event"] == "done", done
    assert "".join(t["text"] for t in tokens).strip()
    assert done["usage"]["prompt_tokens"] > 5  # the chat template wrapped the message


def test_non_streamed_matches_streamed(llama_daemon):
    client = llama_daemon.client()
    request = {"prompt": "Water boils at", "max_tokens": 20, "temperature": 0.0, "seed": 3}
    streamed, done_streamed = collect(client.generate(**request))
    events = list(client.generate(stream=False, **request))
    assert len(events) == 1, "stream=false answers with the terminal event alone"
    done = events[0]
    assert done["event"] == "done"
    assert done["text"] == "".join(t["text"] for t in streamed)
    assert done["usage"]["completion_tokens"] == done_streamed["usage"]["completion_tokens"]


def test_a_stop_string_ends_the_text_before_it(llama_daemon):
    client = llama_daemon.client()
    request = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0.0, "seed": 3}
    tokens, full = collect(client.generate(**request))
    text = "".join(t["text"] for t in tokens)
    stop = text.split()[2]  # a word a few tokens in, which may span tokens
    tokens, done = collect(client.generate(stop=[stop], **request))
    assert done["event"] == "done" and done["finish_reason"] == "stop", done
    assert "".join(t["text"] for t in tokens) == text[: text.index(stop)]
    assert done["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]


def test_cancel_mid_stream_ends_within_two_tokens(llama_daemon):
    client = llama_daemon.client()
    request_id = client.send({"op": "generate", "max_tokens": 500, **LONG})
    seen = 0
    for event in client.events(request_id):
        assert event["event"] == "token", event
        seen += 1
        if seen == 5:
            break
    ack = client.cancel(request_id)
    assert ack["event"] == "cancel_ack" and ack["found"] is True
    after, done = collect(client.events(request_id))
    assert done["event"] == "done" and done["finish_reason"] == "cancelled", done
    assert len(after) <= 2, f"{len(after)} tokens arrived after the cancel"
    assert done["usage"]["completion_tokens"] < 500
    assert_nothing_after(client, request_id)


def test_cancel_of_unknown_request_is_acknowledged_as_not_found(llama_daemon):
    ack = llama_daemon.client().cancel("no-such-request")
    assert ack["event"] == "cancel_ack" and ack["found"] is False


def test_four_concurrent_clients_are_served_completely_in_fifo_order(llama_daemon):
    results: dict[int, dict[str, Any]] = {}

    def run(n: int) -> None:
        client = llama_daemon.client()
        tokens, done = collect(client.generate(max_tokens=30, **LONG))
        results[n] = {"done": done, "text": "".join(t["text"] for t in tokens), "tokens": len(tokens)}

    threads = []
    for n in range(4):
        thread = threading.Thread(target=run, args=(n,))
        thread.start()
        threads.append(thread)
        # Each request is known to the daemon (running or queued) before the next is sent.
        llama_daemon.wait_for(
            lambda s, n=n: _engine(s)["in_flight"] + _engine(s)["queue_depth"] >= min(n + 1, 4) or len(results) > n
        )
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3]
    for result in results.values():
        assert result["done"]["event"] == "done", result["done"]
        assert result["done"]["finish_reason"] == "length"
        assert result["done"]["usage"]["completion_tokens"] == 30
        assert result["text"].strip()
    # Same prompt, greedy: the same answer for everyone.
    assert len({r["text"] for r in results.values()}) == 1
    # FIFO: each waited in the queue longer than the one sent before it.
    queued = [results[n]["done"]["timings"]["queued_ms"] for n in range(4)]
    ends = [results[n]["done"]["timings"]["total_ms"] for n in range(4)]
    assert queued == sorted(queued), queued
    assert all(q > 0 for q in queued[1:])
    assert ends[1:] == sorted(ends[1:])


def _engine(status: dict[str, Any], name: str = "llama") -> dict[str, Any]:
    return next(e for e in status["engines"] if e["name"] == name)


def test_deadline_ends_a_long_generation(llama_daemon):
    client = llama_daemon.client()
    started = time.monotonic()
    tokens, terminal = collect(client.generate(max_tokens=1500, deadline_ms=1500, **LONG))
    elapsed = time.monotonic() - started
    assert terminal["event"] == "error" and terminal["code"] == "deadline_exceeded", terminal
    assert tokens, "some tokens streamed before the deadline"
    assert elapsed < 10, elapsed
    # The worker stopped generating: it is idle again without finishing 1500 tokens.
    llama_daemon.wait_for(
        lambda s: _engine(s)["in_flight"] == 0 and _engine(s)["workers"][0]["phase"] == "idle", timeout=5
    )
    tokens, done = collect(client.generate(prompt="Hello", max_tokens=5))
    assert done["event"] == "done"


def test_deadline_while_queued(llama_daemon):
    first, second = llama_daemon.client(), llama_daemon.client()
    blocker = first.send({"op": "generate", "max_tokens": 200, **LONG})
    llama_daemon.wait_for(lambda s: _engine(s)["in_flight"] == 1)
    _, terminal = collect(second.generate(prompt="Hi", max_tokens=5, deadline_ms=300))
    assert terminal["event"] == "error" and terminal["code"] == "deadline_exceeded"
    assert terminal["timings"]["ttft_ms"] is None
    first.cancel(blocker)
    _, done = collect(first.events(blocker))
    assert done["finish_reason"] == "cancelled"


def test_full_queue_answers_busy(make_daemon):
    daemon = make_daemon({"llama": {**LLAMA, "max_queue": 1}})
    running, queued, refused = daemon.client(), daemon.client(), daemon.client()
    first = running.send({"op": "generate", "max_tokens": 400, **LONG})
    daemon.wait_for(lambda s: _engine(s)["in_flight"] == 1)
    second = queued.send({"op": "generate", "max_tokens": 5, **LONG})
    daemon.wait_for(lambda s: _engine(s)["queue_depth"] == 1)
    _, terminal = collect(refused.generate(prompt="Hi", max_tokens=5))
    assert terminal["event"] == "error" and terminal["code"] == "busy", terminal
    assert "llama" in terminal["message"]
    running.cancel(first)
    assert collect(running.events(first))[1]["finish_reason"] == "cancelled"
    assert collect(queued.events(second))[1]["event"] == "done"
    assert collect(refused.generate(prompt="Hi", max_tokens=5))[1]["event"] == "done"


def test_status_reports_engines_workers_and_latency(llama_daemon):
    client = llama_daemon.client()
    collect(client.generate(prompt="One, two,", max_tokens=8))
    # "phase" is the worker's own word, as of its last heartbeat.
    status = llama_daemon.wait_for(lambda s: _engine(s)["workers"][0]["phase"] == "idle", timeout=5)
    daemon = status["daemon"]
    assert daemon["pid"] == llama_daemon.process.pid and daemon["uptime_s"] > 0
    llama = _engine(status)
    assert llama["state"] == "ready" and llama["kind"] == "llamacpp"
    assert llama["model"].endswith("gemma-3-270m-q4_k_m.gguf")
    assert llama["queue_depth"] == 0 and llama["max_queue"] == 16 and llama["served"] >= 1
    assert llama["latency"]["ttft_ms"]["samples"] >= 1 and llama["latency"]["ttft_ms"]["p50"] > 0
    assert llama["latency"]["per_token_ms"]["p95"] >= llama["latency"]["per_token_ms"]["p50"] > 0
    (worker,) = llama["workers"]
    assert worker["state"] == "ready" and worker["phase"] == "idle"
    process = psutil.Process(worker["pid"])
    assert process.is_running() and worker["rss_bytes"] > 50 * 2**20  # the model is in memory
    assert worker["uptime_s"] > 0 and worker["last_heartbeat_age_ms"] < 3000
    assert worker["versions"]["llama_cpp_python"] == "0.3.36"
    assert worker["model"]["architecture"] == "gemma3" and worker["model"]["n_ctx"] == 2048
    broken = _engine(status, "broken")
    assert broken["state"] == "model_not_found" and "/nonexistent/missing.gguf" in broken["reason"]


def test_status_command_shows_the_worker_ready(llama_daemon):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "--config", str(llama_daemon.config_path), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "engine llama (llamacpp, priority 10, warm): ready" in result.stdout
    assert "worker llama.1: ready" in result.stdout
    assert "llama.cpp: 2 threads, 2 for prompts, n_batch 512, n_ubatch 512, flash attention off" in result.stdout
    assert "plan: gemma-3-270m-q4_k_m.gguf on CPU, n_ctx 2048, f16 KV cache" in result.stdout


def test_generate_command_streams_text(llama_daemon):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor.cli",
            "--config",
            str(llama_daemon.config_path),
            "generate",
            "Hello",
            "--max-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "12 tokens" in result.stderr or "stop:" in result.stderr


def test_worker_reports_what_llama_cpp_offloaded_and_its_devices(llama_daemon):
    """What llama.cpp did, not what was asked: on this CPU-only build nothing is offloaded, and it says so."""
    worker = llama_daemon.engine("llama")["workers"][0]
    model = worker["model"]
    assert model["gpu_offload"] is False and model["offloaded_layers"] == 0, model
    assert model["offloadable_layers"] == 19  # Gemma 3 270M: 18 blocks and the output layer
    assert [d["type"] for d in model["devices"]] == ["cpu"] and model["devices"][0]["total_bytes"] > 0


def test_worker_reports_the_threads_batches_and_flash_attention_in_force(llama_daemon):
    """The configured threads (conftest's LLAMA), the CPU's batch sizes, flash attention off on the CPU."""
    model = llama_daemon.engine("llama")["workers"][0]["model"]
    in_force = {k: model[k] for k in ("n_threads", "n_threads_batch", "n_batch", "n_ubatch", "flash_attn")}
    assert in_force == {
        "n_threads": LLAMA["n_threads"],
        "n_threads_batch": LLAMA["n_threads"],
        "n_batch": 512,
        "n_ubatch": 512,
        "flash_attn": False,
    }


def worker_output(daemon, worker_id: str) -> list[dict[str, Any]]:
    """What a worker printed, as the daemon logged it (its JSON console output)."""
    records = []
    for line in daemon.log_text().splitlines():
        if '"worker.output"' in line and f'"{worker_id}"' in line:
            records.append(json.loads(line))
    return records


def test_a_worker_start_logs_at_most_50_lines_at_info(llama_daemon):
    """llama.cpp's load detail (the metadata dump, hyper-parameters, vocabulary, scheduler
    internals: ~1,350 lines) is debug; what was loaded, its context and buffers stay at info."""
    worker_id = llama_daemon.engine("llama")["workers"][0]["id"]
    relayed = worker_output(llama_daemon, worker_id)
    assert 0 < len(relayed) <= 50, "\n".join(r["event"] for r in relayed)
    assert {r["level"] for r in relayed} <= {"info", "warning", "error"}
    llama_cpp = [r["event"] for r in relayed if r.get("source") == "llama.cpp"]
    assert any(
        line.startswith("llama_model_loader: loaded meta data") and "gemma-3-270m" in line for line in llama_cpp
    ), llama_cpp
    assert any("model buffer size" in line for line in llama_cpp) and any(
        "compute buffer size" in line for line in llama_cpp
    )
    assert any(line.startswith("llama_context: n_ctx ") and line.endswith("= 2048") for line in llama_cpp)
    assert not any(" - kv " in line or line.startswith("print_info: n_head") for line in llama_cpp)
    assert not any("llama_graph_n_input_tensors" in r["event"] for r in relayed)  # a debug line, 558 times per load


def test_at_debug_the_load_detail_is_logged_at_debug(make_daemon):
    daemon = make_daemon({"llama": LLAMA}, log_level="debug")
    worker = daemon.engine("llama")["workers"][0]
    relayed = worker_output(daemon, worker["id"])
    by_level = {
        level: [r["event"] for r in relayed if r.get("source") == "llama.cpp" and r["level"] == level]
        for level in ("debug", "info")
    }
    assert any(" - kv " in line and "general.architecture" in line for line in by_level["debug"]), len(relayed)
    assert any(line.startswith("print_info: n_head ") for line in by_level["debug"])
    assert not any(" - kv " in line for line in by_level["info"]) and 0 < len(by_level["info"]) <= 50
    assert worker["model"]["offloadable_layers"] == 19  # the load's report is the same at any level


def test_an_auto_engine_is_planned_for_the_cpu_here_and_says_why(llama_daemon):
    """n_gpu_layers is "auto" by default: on a machine without a usable GPU the plan in force is the CPU, with the probe's reason."""
    status = llama_daemon.status()
    assert status["gpu"]["devices"] == [] and status["gpu"]["reason"], status["gpu"]
    engine = next(e for e in status["engines"] if e["name"] == "llama")
    plan = engine["plan"]
    assert plan is not None and plan["chosen"]["n_gpu_layers"] == 0 and plan["chosen"]["n_ctx"] == 2048, plan
    assert any(status["gpu"]["reason"] in reason for reason in plan["reasons"]), plan["reasons"]
    worker = engine["workers"][0]
    assert worker["gpu_memory_bytes"] is None and worker["model"]["n_gpu_layers"] == 0
    planned = [line for line in llama_daemon.log_text().splitlines() if '"load planned"' in line and '"llama"' in line]
    assert len(planned) == 1, planned
