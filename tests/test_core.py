"""The routing and failover rules, driven in-process: no process, no socket, a manual clock.

Each test reads what the core decided from the effects it asked for.  The
real-process suites (test_serving, test_supervision, ...) stay as the
acceptance tests of the same behaviour.
"""

from __future__ import annotations

import pytest

from supervisor.config import load_settings
from supervisor.core.lifecycle import WorkerState
from supervisor.core.errors import Refused
from workers import protocol as p
from workers.protocol import messages as m

from .core_harness import Core, hello

FAKE = {"kind": "fake"}


def test_a_request_on_a_cold_engine_starts_it_and_is_dispatched_once_it_is_ready():
    core = Core({"a": {**FAKE, "priority": 1}, "b": {**FAKE, "standby": "cold", "priority": 2}})
    core.supervisor.start(core.now)
    assert core.effects.named("start") == ["a.1"]
    core.submit("r1", engine="b")
    assert core.effects.named("start") == ["a.1", "b.1"]
    assert core.effects.worker_messages("b.1", m.Generate.TYPE) == []  # not before it is ready
    core.supervisor.on_hello(core.engine("b"), hello(1), core.now)
    assert core.effects.worker_messages("b.1", m.Load.TYPE)[0]["spec"]["model"] == "/models/b.gguf"
    core.supervisor.on_ready(core.engine("b"), m.Ready(model={}), core.now)
    (generate,) = core.effects.worker_messages("b.1", m.Generate.TYPE)
    assert generate["prompt"] == "hi"
    core.tokens("b", 2)
    core.finish_current("b")
    (done,) = core.terminal("r1")
    assert done["event"] == "done" and done["usage"]["completion_tokens"] == 2 and done["worker"] == "b.1"
    assert core.engine("b").stats.served == 1


def test_one_queue_bound_for_new_and_retried_requests():
    core = Core({"a": {**FAKE, "max_queue": 1}})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.submit("running")
    core.submit("waiting")
    with pytest.raises(Refused) as refused:
        core.submit("third")
    assert refused.value.code == p.ErrorCode.BUSY
    # The running request's worker dies before a token: its retry meets the same bound (the queue is full).
    core.exit("a", 1)
    (failed,) = core.terminal("running")
    assert failed["code"] == p.ErrorCode.ENGINE_FAILED
    assert core.terminal("waiting") == []  # still waiting for the restart


def test_a_request_whose_worker_dies_before_a_token_is_retried_first_on_the_restart():
    core = Core({"a": FAKE})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.submit("first")
    core.submit("second")
    core.exit("a", 1)
    assert core.engine("a").worker.state is WorkerState.BACKOFF
    assert [r.id for r in core.engine("a").queue] == ["first", "second"]  # the retry goes in front
    assert core.effects.topics("request.retry")[0]["request_id"] == "first"
    restart_at = core.engine("a").worker.times.restart_at
    core.advance(restart_at - core.now + 0.01)
    assert core.effects.named("start") == ["a.1", "a.2"]
    core.bring_up("a")
    assert core.current("a").id == "first"


def test_a_request_that_streamed_tokens_fails_with_the_tokens_it_got():
    core = Core({"a": FAKE})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.submit("r")
    core.tokens("a", 3)
    core.exit("a", None, cause="killed by SIGKILL")
    (failed,) = core.terminal("r")
    assert failed["code"] == p.ErrorCode.ENGINE_FAILED and failed["usage"]["completion_tokens"] == 3
    assert "killed by SIGKILL" in failed["message"]


def test_deadlines_end_queued_and_running_requests_once():
    core = Core({"a": FAKE})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.submit("running", deadline_ms=1000)
    core.submit("queued", deadline_ms=500)
    assert core.now + 0.5 in core.effects.named("wake_at")
    core.advance(0.6)
    assert core.terminal("queued")[0]["code"] == p.ErrorCode.DEADLINE
    assert core.terminal("running") == []
    core.advance(0.5)
    assert core.terminal("running")[0]["code"] == p.ErrorCode.DEADLINE
    wire_id = core.current("a").wire_id
    assert core.effects.worker_messages("a.1", m.Cancel.TYPE) == [{"type": m.Cancel.TYPE, "request_id": wire_id}]
    core.finish_current("a", p.FINISH_CANCELLED)  # the worker confirms: no second end
    assert len(core.terminal("running")) == 1
    assert core.engine("a").stats.failed == 2


def test_a_client_that_cannot_be_reached_ends_its_requests_through_the_terminal_path():
    core = Core({"a": FAKE})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.submit("streaming", client=b"slow")
    core.submit("waiting", client=b"slow")
    core.submit("other", client=b"fine")
    core.effects.refusing_clients.add(b"slow")
    core.tokens("a", 1)
    assert core.router.requests.keys() == {(b"fine", "other")}
    stats = core.engine("a").stats
    assert stats.finished[p.FINISH_CANCELLED] == 2 and stats.failed == 0  # counted, like every end: not as failures
    assert core.effects.worker_messages("a.1", m.Cancel.TYPE)  # no compute spent on it
    assert [r.id for r in core.engine("a").queue] == ["other"]


def test_repeated_crashes_open_the_circuit_and_traffic_moves_to_the_next_engine():
    core = Core({"a": {**FAKE, "priority": 1}, "b": {**FAKE, "priority": 2}}, supervision={"circuit_failures": 2})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.bring_up("b")
    assert core.switch.active == "a"
    core.exit("a", 1)
    core.advance(core.engine("a").worker.times.restart_at - core.now + 0.01)
    core.submit("r")  # waits on a while it restarts
    core.exit("a", 1)
    assert core.engine("a").breaker.state.value == "open"
    assert core.switch.active == "b"
    assert core.current("b").id == "r"
    assert core.effects.topics("engine.circuit")[-1]["state"] == "open"


def test_a_worker_that_loads_and_then_fails_every_time_still_opens_the_circuit():
    # A remote engine whose upstream answers 429: each worker loads fine, reports why it cannot go on, and exits 1.
    core = Core({"a": {**FAKE, "priority": 1}, "b": {**FAKE, "priority": 2}}, supervision={"circuit_failures": 2})
    core.supervisor.start(core.now)
    core.bring_up("b")
    for attempt in (1, 2):
        core.bring_up("a")
        assert core.engine("a").breaker.state.value == "closed"
        core.supervisor.on_failed(
            core.engine("a"),
            m.Failed(code="engine_failed", message="upstream answered 429 Too Many Requests"),
            core.now,
        )
        core.exit("a", 1)
        if attempt == 1:
            core.advance(core.engine("a").worker.times.restart_at - core.now + 0.01)
    assert core.engine("a").breaker.state.value == "open" and core.switch.active == "b"
    assert core.engine("a").refusal == ("engine_failed", "circuit open: upstream answered 429 Too Many Requests")
    assert core.engine("a").stats.restarts["crash"] == 2  # a crash, not a load failure


def test_a_retry_after_in_a_failure_report_delays_the_restart():
    core = Core({"a": FAKE}, supervision={"restart_backoff_base_s": 1.0})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.supervisor.on_failed(
        core.engine("a"), m.Failed(code="engine_failed", message="429", retry_after_s=20), core.now
    )
    core.exit("a", 1)
    assert core.engine("a").worker.times.restart_at == core.now + 20
    core.advance(19.9)
    assert core.effects.named("start") == ["a.1"]
    core.advance(0.2)
    assert core.effects.named("start") == ["a.1", "a.2"]


def test_an_engine_that_cannot_run_here_fails_once_and_refuses_pinned_requests():
    core = Core({"a": {**FAKE, "priority": 1}, "b": {**FAKE, "priority": 2}})
    core.supervisor.start(core.now)
    core.supervisor.on_hello(core.engine("a"), hello(1), core.now)
    core.supervisor.on_load_failed(
        core.engine("a"), m.LoadFailed(code="unavailable", message="no CUDA", exit_code=69), core.now
    )
    core.exit("a", p.ExitCode.UNAVAILABLE)
    assert core.engine("a").worker.state is WorkerState.FAILED
    with pytest.raises(Refused) as refused:
        core.submit("pinned", engine="a")
    assert refused.value.code == p.ErrorCode.ENGINE_UNAVAILABLE and "no CUDA" in refused.value.message
    core.advance(120)
    assert core.effects.named("start") == ["a.1", "b.1"]  # never restarted


def test_silence_and_stalls_get_a_worker_killed_but_slow_loading_does_not():
    core = Core({"a": FAKE}, supervision={"load_stall_s": 60})
    core.supervisor.start(core.now)
    core.supervisor.on_hello(core.engine("a"), hello(1), core.now)
    for _ in range(30):  # loading, with progress reports and heartbeats: slow is not dead
        core.advance(1.0)
        core.supervisor.heard_from(core.engine("a"), core.now)
        core.supervisor.on_loading(core.engine("a"), m.Loading(progress=0.5), core.now)
    assert core.effects.named("kill") == []
    core.supervisor.on_ready(core.engine("a"), m.Ready(), core.now)
    core.advance(3.5)  # three heartbeat intervals of silence
    assert core.effects.named("kill") == ["a.1"]
    assert "no heartbeat" in core.effects.topics("worker.hang")[0]["reason"]


def test_an_idle_worker_gets_a_liveness_probe_and_is_replaced_when_it_fails():
    core = Core({"a": FAKE}, supervision={"probe_interval_s": 5, "probe_timeout_s": 2})
    core.supervisor.start(core.now)
    core.bring_up("a")
    for _ in range(6):
        core.advance(1.0)
        core.supervisor.heard_from(core.engine("a"), core.now)
    probe = core.current("a")
    assert probe is not None and probe.id.startswith("probe-")
    assert core.router.requests == {}  # not a client request
    core.advance(1.0)
    core.supervisor.heard_from(core.engine("a"), core.now)
    core.advance(1.1)  # the probe's deadline passes without a token
    (result,) = core.effects.topics("probe.result")
    assert result["ok"] is False and "deadline" in result["error"]
    assert core.effects.named("kill") == ["a.1"]
    assert core.effects.client_events() == []


def test_a_second_gpu_engine_waits_for_an_exclusive_one_to_exit():
    core = Core(
        {
            "a": {**FAKE, "n_gpu_layers": -1, "priority": 1, "exclusive": True},
            "b": {**FAKE, "n_gpu_layers": -1, "priority": 2, "standby": "cold"},
        }
    )
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.submit("r", engine="b")
    assert core.effects.named("start") == ["a.1"]
    assert core.effects.named("stop") == ["a.1"]
    core.exit("a", 0)
    assert core.effects.named("start") == ["a.1", "b.1"]


def test_per_token_latency_counts_tokens_not_events():
    core = Core({"a": FAKE})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.submit("r")
    core.now += 0.1
    core.tokens("a", 1)
    for _ in range(10):  # 10 events of 4 tokens each, 40 ms apart: 10 ms per token
        core.now += 0.04
        core.tokens("a", 1, per_event=4)
    core.finish_current("a")
    summary = core.engine("a").latency.summary(core.now)
    assert summary["per_token_ms"]["p50"] == pytest.approx(400 / 40, rel=0.01)
    token_events = [e for e in core.effects.client_events() if e["event"] == "token"]
    assert [e["index"] for e in token_events] == list(range(11))


def test_a_traffic_switch_moves_waiting_unpinned_requests_but_not_pinned_ones():
    core = Core({"a": {**FAKE, "priority": 1}, "b": {**FAKE, "priority": 2}})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.submit("busy")
    core.submit("unpinned")
    core.submit("pinned", engine="a")
    core.bring_up("b")
    core.exit("a", 1)  # a restarts: not healthy, traffic switches to b
    assert core.switch.active == "b"
    assert core.current("b").id == "busy"  # retried on b
    assert [r.id for r in core.engine("b").queue] == ["unpinned"]
    assert [r.id for r in core.engine("a").queue] == ["pinned"]


def test_shutdown_refuses_new_requests():
    core = Core({"a": FAKE})
    core.supervisor.start(core.now)
    core.engines.stopping = True
    with pytest.raises(Refused) as refused:
        core.submit("late")
    assert refused.value.code == p.ErrorCode.SHUTTING_DOWN


# --- planned loads: the plan in force shapes the load, and out of GPU memory is a planned step ---------


def _planner(snapshots, variants, **engine):
    """Effects.plan_load for one engine: the real planner over recorded GPUs (one snapshot per plan), a stand-in estimate."""
    from supervisor.planning.decide.plan import engine_request, make_plan, plan_again, replan_after_oom
    from supervisor.planning.decide.types import Estimators, GpuPolicy, PlanInputs

    from . import plan_fixtures as fx

    config = load_settings(
        None, {"state_dir": "/nonexistent", "engines": {"a": {"kind": "llamacpp", **engine}}}
    ).engines["a"]
    shots = iter(snapshots)

    def plan_load(previous, after_oom):
        snapshot, request = next(shots), engine_request("a", config, variants, 512)
        if previous is not None:
            return replan_after_oom(previous, "a", snapshot) if after_oom else plan_again(previous, snapshot, request)
        inputs = PlanInputs(snapshot, (request,), GpuPolicy(), Estimators(fx.estimate_llamacpp, fx.estimate_exl2))
        return make_plan(inputs)

    return plan_load


def test_an_auto_engine_loads_what_the_plan_chose_and_a_load_out_of_gpu_memory_steps_down_without_a_crash():
    from . import plan_fixtures as fx

    variants = [fx.gguf("/m/q6.gguf", 2500), fx.gguf("/m/q4.gguf", 1900)]
    gpu = fx.snapshot(fx.device(0, 12288, neighbours_mib=5120))
    core = Core({"a": {"kind": "llamacpp", "n_gpu_layers": "auto", "model": ["/m/q6.gguf", "/m/q4.gguf"]}})
    core.effects.planners["a"] = _planner(
        [gpu, gpu, gpu], variants, n_gpu_layers="auto", model=["/m/q6.gguf", "/m/q4.gguf"]
    )
    core.supervisor.start(core.now)
    core.supervisor.on_hello(core.engine("a"), hello(1), core.now)
    (load,) = core.effects.worker_messages("a.1", m.Load.TYPE)
    assert load["spec"]["model"].endswith("q6.gguf") and load["spec"]["n_gpu_layers"] == -1
    assert core.engine("a").uses_gpu
    # The worker says the GPU could not take it, and exits with the model-error code.
    core.supervisor.on_load_failed(
        core.engine("a"),
        m.LoadFailed(code=p.ErrorCode.GPU_OUT_OF_MEMORY, message="cudaMalloc failed", exit_code=65),
        core.now,
    )
    core.exit("a", p.ExitCode.MODEL_ERROR)
    assert core.engine("a").breaker.state.value == "closed" and core.engine("a").worker.restarts == 0
    core.advance(0.01)
    (second,) = core.effects.worker_messages("a.2", m.Load.TYPE) or [None]
    assert second is None  # not before its hello
    core.supervisor.on_hello(core.engine("a"), hello(2), core.now)
    (second,) = core.effects.worker_messages("a.2", m.Load.TYPE)
    assert (second["spec"]["model"], second["spec"]["n_ctx"]) != (
        load["spec"]["model"],
        load["spec"]["n_ctx"],
    )  # never the same again
    plans = core.effects.topics("engine.plan")
    assert len(plans) == 2 and plans[1]["after_oom"] is True


def test_an_engine_whose_plan_finds_nothing_to_load_fails_once_with_the_reason():
    from . import plan_fixtures as fx

    variants = [fx.exl2("/m/exl2-6bpw", 3000, 6.0)]
    tiny = fx.snapshot(fx.device(0, 2048, neighbours_mib=1800))
    core = Core({"a": {"kind": "exllamav2", "model": "/m/exl2-6bpw"}})
    core.effects.planners["a"] = _planner([tiny], variants, model="/m/exl2-6bpw")
    core.supervisor.start(core.now)
    assert core.effects.named("start") == []
    assert core.engine("a").worker.state is WorkerState.FAILED
    assert (
        core.engine("a").refusal[0] == p.ErrorCode.ENGINE_UNAVAILABLE
        and "nothing to load" in core.engine("a").refusal[1]
    )


def test_a_worker_with_slots_runs_that_many_requests_at_once_and_each_token_reaches_its_own_request():
    core = Core({"a": FAKE})
    core.supervisor.start(core.now)
    core.supervisor.on_hello(core.engine("a"), hello(1), core.now)
    core.supervisor.on_ready(core.engine("a"), m.Ready(model={}, slots=2), core.now)
    for rid in ("r1", "r2", "r3"):
        core.submit(rid)
    first, second = core.engine("a").worker.running.values()
    assert (first.id, second.id) == ("r1", "r2") and [g.id for g in core.engine("a").queue] == ["r3"]
    assert core.engine("a").describe(core.now)["in_flight"] == 2
    core.tokens("a", 3, wire_id=second.wire_id)
    core.tokens("a", 1, wire_id=first.wire_id)
    core.finish_current("a", wire_id=second.wire_id)
    (done,) = core.terminal("r2")
    assert done["usage"]["completion_tokens"] == 3
    assert [g.id for g in core.engine("a").worker.running.values()] == ["r1", "r3"]  # the freed slot took r3
    core.submit("r4")
    third = core.engine("a").worker.running
    r3_wire = next(w for w, g in third.items() if g.id == "r3")
    core.router.cancel([b"c"], "r3", core.now)
    assert core.effects.worker_messages("a.1", m.Cancel.TYPE)[-1]["request_id"] == r3_wire
    # The worker dies before confirming: r1 streamed a token and fails; r3 ends as the client asked;
    # r4, still waiting, is served by the restart.
    core.exit("a", 1)
    (failed,) = core.terminal("r1")
    assert failed["code"] == p.ErrorCode.ENGINE_FAILED and failed["usage"]["completion_tokens"] == 1
    (cancelled,) = core.terminal("r3")
    assert cancelled["finish_reason"] == p.FINISH_CANCELLED
    assert [g.id for g in core.engine("a").queue] == ["r4"]


def test_a_ready_message_with_a_nonsense_slot_count_gets_one_slot():
    core = Core({"a": FAKE})
    core.supervisor.start(core.now)
    core.supervisor.on_hello(core.engine("a"), hello(1), core.now)
    core.supervisor.on_ready(core.engine("a"), m.Ready(model={}, slots=10_000), core.now)
    assert core.engine("a").worker.slots == 1
