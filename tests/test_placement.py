"""Many models on one node, driven in-process: recorded GPU figures, a manual clock.

Load on demand, idle unload at keep_alive, placement by measured memory,
eviction of idle models least recently used first, on_no_room, several GPUs
and the thrash guard.  The GPU is a recorded one (FakeGpu below): what each
worker holds is what "NVML" reports for its pid once it has loaded, never the
engine's estimate.
"""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.config import load_settings
from supervisor.core.lifecycle import WorkerState
from supervisor.core.placement import GpuRoom, Holder, place
from supervisor.core.validate import InvalidMessage, parse_keep_alive, parse_load, parse_unload
from supervisor.planning.measure.inputs import gpu_room
from workers import protocol as p
from workers.protocol import messages as m

from . import plan_fixtures as fx
from .core_harness import Core, hello

MIB = 1 << 20
FAKE = {"kind": "fake", "n_gpu_layers": -1, "standby": "cold"}


class FakeGpu:
    """Devices whose free memory is their total less a neighbour's share and what our workers hold."""

    def __init__(self, core: Core, *totals_mib: int) -> None:
        self.core = core
        self.totals = list(totals_mib)
        self.neighbours = [0] * len(totals_mib)
        self.held: dict[int, dict[int, int]] = {}  # pid -> device -> MiB
        self.pids = iter(range(100, 10_000))
        self.reserve_mib = core.settings.gpu.reserve_mib
        core.effects.room = self.room

    def snapshot(self) -> Any:
        devices = []
        for index, total in enumerate(self.totals):
            own = {pid: held[index] for pid, held in self.held.items() if index in held}
            devices.append(fx.device(index, total, self.neighbours[index], own))
        return fx.snapshot(*devices)

    def room(self) -> GpuRoom | None:
        from supervisor.planning.decide.types import GpuPolicy

        return gpu_room(self.snapshot(), GpuPolicy(reserve_bytes=self.reserve_mib * MIB))

    def load(self, name: str, mib: int) -> int:
        """The engine's worker says hello, loads (and now holds ``mib`` on the devices it was launched
        on, in proportion to the shares planned there when it was split), is ready."""
        core = self.core
        engine = core.engine(name)
        pid = next(self.pids)
        core.supervisor.on_hello(engine, hello(pid), core.now)
        launch = next(x for x in reversed(core.effects.launches) if x.engine == name)
        devices = launch.devices or (0,)
        shares = engine.residency.shares if len(engine.residency.shares) == len(devices) else (1,) * len(devices)
        self.held[pid] = {d: mib * share // sum(shares) for d, share in zip(devices, shares)}
        core.supervisor.on_ready(engine, m.Ready(), core.now)
        return pid

    def exit(self, name: str) -> None:
        """The worker exits as asked; NVML no longer counts its memory."""
        engine = self.core.engine(name)
        self.held.pop(engine.worker.pid, None)
        self.core.exit(name, 0)


def core_with(engines: dict[str, dict[str, Any]], *totals_mib: int, **gpu: Any) -> tuple[Core, FakeGpu]:
    # No liveness probes: the harness never answers them, and a probe running keeps a model busy.
    core = Core(engines, gpu={"min_residency_s": 0, **gpu}, supervision={"probe_interval_s": 0})
    return core, FakeGpu(core, *totals_mib)


def serve(core: Core, rid: str, name: str, **fields: Any) -> None:
    core.submit(rid, engine=name, **fields)
    core.finish_current(name)


def heard(core: Core, seconds: int) -> None:
    """Time passes with the live workers' heartbeats arriving (no hang)."""
    for _ in range(seconds):
        for engine in core.engines:
            if engine.worker.alive:
                core.supervisor.heard_from(engine, core.now)
        core.advance(1)


def unloads(core: Core) -> list[tuple[str, str]]:
    return [(e["engine"], e["reason"]) for e in core.effects.topics("engine.unload")]


# --- the pure decision ------------------------------------------------------------------------


def test_place_picks_the_device_with_room_then_the_cheapest_eviction_then_no_room():
    room = GpuRoom({0: 1000 * MIB, 1: 3000 * MIB})
    assert place(2000 * MIB, room, []).device == 1
    old = Holder("old", {0: 2500 * MIB}, last_used_at=1.0, evictable=True)
    new = Holder("new", {0: 2500 * MIB}, last_used_at=5.0, evictable=True)
    busy = Holder("busy", {1: 4000 * MIB}, last_used_at=0.0, evictable=False)
    decision = place(3500 * MIB, room, [new, old, busy])
    assert (decision.kind, decision.device, decision.victims) == ("evict", 0, ("old",))
    none = place(9000 * MIB, room, [busy])
    assert none.kind == "no_room" and none.describe() == "needs 9000 MiB, 3000 MiB free"


# --- load on demand and side by side ----------------------------------------------------------------


def test_two_models_that_fit_both_load_side_by_side():
    core, gpu = core_with({"a": {**FAKE, "gpu_mib": 4000}, "b": {**FAKE, "gpu_mib": 4000}}, 10_000)
    core.submit("ra", engine="a")
    gpu.load("a", 4000)
    core.submit("rb", engine="b")
    assert core.effects.named("start") == ["a.1", "b.1"] and core.effects.named("stop") == []
    gpu.load("b", 4000)
    assert core.engine("a").worker.state is core.engine("b").worker.state is WorkerState.READY
    assert [e["reason"] for e in core.effects.topics("engine.load")] == ["demand", "demand"]


def test_ten_concurrent_requests_for_a_cold_model_cause_one_load_and_all_are_served():
    core, gpu = core_with({"a": {**FAKE, "gpu_mib": 1000}}, 10_000)
    for i in range(10):
        core.submit(f"r{i}", engine="a")
    assert core.effects.named("start") == ["a.1"]
    core.advance(1.5)  # loading takes a while: the load time is part of their ttft
    gpu.load("a", 1000)
    for _ in range(10):
        core.finish_current("a")
    ends = [core.terminal(f"r{i}") for i in range(10)]
    assert all(len(e) == 1 and e[0]["event"] == "done" for e in ends)
    assert ends[0][0]["timings"]["load_ms"] == pytest.approx(1500, abs=1)
    assert core.effects.named("start") == ["a.1"] and core.engine("a").residency.loads == {"demand": 1}


# --- idle unload -------------------------------------------------------------------------------------


def test_an_idle_model_is_unloaded_at_exactly_keep_alive_as_a_planned_stop():
    core, gpu = core_with({"a": {**FAKE, "keep_alive": 10}}, 10_000)
    core.submit("r", engine="a")
    gpu.load("a", 1000)
    core.finish_current("a")
    core.advance(9.999)
    assert core.effects.named("stop") == []
    assert core.engine("a").describe_residency(core.now)["unload_in_s"] == pytest.approx(0.0, abs=0.01)
    core.advance(0.001)
    assert core.effects.named("stop") == ["a.1"] and unloads(core) == [("a", "idle")]
    gpu.exit("a")
    engine = core.engine("a")
    # No restart, no backoff, no circuit count: the next request loads it again.
    assert engine.worker.state is WorkerState.STOPPED and engine.worker.restarts == 0
    assert engine.breaker.state.value == "closed" and sum(engine.stats.restarts.values()) == 0
    core.advance(60)
    assert core.effects.named("start") == ["a.1"]
    core.submit("again", engine="a")
    assert core.effects.named("start") == ["a.1", "a.2"]


def test_keep_alive_defaults_300_for_cold_engines_and_never_for_warm_ones():
    core, gpu = core_with({"warm": {**FAKE, "standby": "warm"}, "cold": FAKE}, 10_000)
    assert core.engine("warm").config.keep_alive_s == -1 and core.engine("cold").config.keep_alive_s == 300
    core.supervisor.start(core.now)
    gpu.load("warm", 1000)
    core.submit("c", engine="cold")
    gpu.load("cold", 1000)
    core.finish_current("cold")
    core.advance(299)
    assert core.effects.named("stop") == []
    core.advance(1)
    assert core.effects.named("stop") == ["cold.1"]
    core.advance(10_000)
    assert core.effects.named("stop") == ["cold.1"]  # the warm one stays


def test_a_request_with_keep_alive_0_unloads_the_model_right_after_it():
    core, gpu = core_with({"a": FAKE}, 10_000)
    core.submit("r1", engine="a", keep_alive=0)
    core.submit("r2", engine="a", keep_alive=0)
    gpu.load("a", 1000)
    core.finish_current("a")
    assert core.effects.named("stop") == []  # r2 still to run
    core.finish_current("a")
    assert core.effects.named("stop") == ["a.1"] and unloads(core) == [("a", "idle")]
    assert [e["event"] for e in core.effects.client_events() if e["event"] in ("done", "error")] == ["done", "done"]


def test_a_request_keep_alive_of_minus_one_keeps_the_model_for_ever_and_a_later_one_resets_it():
    core, gpu = core_with({"a": {**FAKE, "keep_alive": 5}}, 10_000)
    core.submit("r1", engine="a", keep_alive="-1")
    gpu.load("a", 1000)
    core.finish_current("a")
    core.advance(3600)
    assert core.effects.named("stop") == []
    serve(core, "r2", "a")  # no keep_alive: the engine's own again
    core.advance(5)
    assert core.effects.named("stop") == ["a.1"]


# --- eviction -----------------------------------------------------------------------------------------


def test_a_third_model_evicts_the_least_recently_used_idle_one_then_loads():
    engines = {name: {**FAKE, "gpu_mib": 4000} for name in "abc"}
    core, gpu = core_with(engines, 10_000)
    core.submit("a1", engine="a")
    gpu.load("a", 4000)
    core.submit("b1", engine="b")
    gpu.load("b", 4000)
    core.advance(1)
    core.finish_current("b")
    core.advance(1)
    core.finish_current("a")  # a used last: b is the least recently used
    core.advance(1)
    core.submit("c1", engine="c")
    assert core.effects.named("stop") == ["b.1"] and unloads(core) == [("b", "evicted")]
    assert core.effects.named("start") == ["a.1", "b.1"]  # c waits for b's memory
    assert "evicting b" in core.engine("c").residency.waiting
    gpu.exit("b")
    assert core.effects.named("start") == ["a.1", "b.1", "c.1"]
    assert core.effects.launches[-1].devices == (0,)
    gpu.load("c", 4000)
    core.finish_current("c")
    assert core.terminal("c1")[0]["event"] == "done"


def test_busy_and_pinned_models_are_never_evicted():
    engines = {
        "pinned": {**FAKE, "gpu_mib": 4000, "pinned": True},
        "busy": {**FAKE, "gpu_mib": 4000},
        "new": {**FAKE, "gpu_mib": 4000, "on_no_room": "wait"},
    }
    core, gpu = core_with(engines, 10_000)
    core.submit("p", engine="pinned")
    gpu.load("pinned", 4000)
    core.finish_current("pinned")
    core.submit("b", engine="busy")
    gpu.load("busy", 4000)
    core.submit("n", engine="new")
    assert core.effects.named("stop") == []
    waiting = core.engine("new").describe(core.now)["residency"]["waiting"]
    assert waiting == "waiting for GPU memory: needs 4000 MiB, 2000 MiB free"
    core.advance(5)
    assert core.effects.named("stop") == []
    core.finish_current("busy")  # now idle: it may go
    core.advance(0.25)
    assert core.effects.named("stop") == ["busy.1"] and unloads(core) == [("busy", "evicted")]
    gpu.exit("busy")
    gpu.load("new", 4000)
    core.finish_current("new")
    assert core.terminal("n")[0]["event"] == "done" and core.terminal("b")[0]["event"] == "done"


def test_the_thrash_guard_keeps_a_model_loaded_less_than_the_minimum_residency():
    engines = {name: {**FAKE, "gpu_mib": 6000} for name in "ab"}
    core, gpu = core_with(engines, 10_000, min_residency_s=30)
    core.submit("a1", engine="a")
    gpu.load("a", 6000)
    core.finish_current("a")
    core.advance(10)
    core.submit("b1", engine="b")  # a loaded 10 s ago: not evicted yet
    assert core.effects.named("stop") == []
    assert core.engine("b").residency.waiting.startswith("waiting for GPU memory")
    core.advance(19.9)
    assert core.effects.named("stop") == []
    core.advance(0.1)
    assert core.effects.named("stop") == ["a.1"]
    gpu.exit("a")
    gpu.load("b", 6000)
    core.finish_current("b")
    # b evicted a; a request for a now must not throw b out before b's own minimum residency.
    core.submit("a2", engine="a")
    assert core.effects.named("stop") == ["a.1"]


# --- no room: the engine's policy --------------------------------------------------------------------


def test_no_room_fails_with_insufficient_memory_under_on_no_room_fail():
    engines = {
        "held": {**FAKE, "gpu_mib": 8000, "pinned": True},
        "new": {**FAKE, "gpu_mib": 4000, "on_no_room": "fail"},
    }
    core, gpu = core_with(engines, 10_000)
    core.submit("h", engine="held")
    gpu.load("held", 8000)
    core.finish_current("held")
    core.submit("n", engine="new")
    (end,) = core.terminal("n")
    assert end["code"] == p.ErrorCode.INSUFFICIENT_MEMORY and "needs 4000 MiB, 2000 MiB free" in end["message"]
    assert core.effects.named("start") == ["held.1"]


def test_no_room_waits_a_bounded_time_under_on_no_room_wait():
    engines = {
        "held": {**FAKE, "gpu_mib": 8000, "pinned": True},
        "new": {**FAKE, "gpu_mib": 4000, "on_no_room": "wait"},
    }
    core, gpu = core_with(engines, 10_000, no_room_wait_s=20)
    core.submit("h", engine="held")
    gpu.load("held", 8000)
    core.finish_current("held")
    core.submit("n", engine="new")
    core.advance(19)
    assert core.terminal("n") == []
    core.advance(1)
    (end,) = core.terminal("n")
    assert end["code"] == p.ErrorCode.INSUFFICIENT_MEMORY and "after waiting 20s" in end["message"]
    assert core.engine("new").residency.waiting is None and core.effects.named("start") == ["held.1"]


def _planned(gpu: FakeGpu, variants: list[Any], **config: Any) -> Any:
    from supervisor.planning.decide.plan import engine_request, make_plan
    from supervisor.planning.decide.types import Estimators, GpuPolicy, PlanInputs

    engine = load_settings(None, {"state_dir": "/nonexistent", "engines": {"big": config}}).engines["big"]

    def plan_load(previous: Any, after_oom: bool) -> Any:
        request = engine_request("big", engine, variants, 512)
        estimators = Estimators(fx.estimate_llamacpp, fx.estimate_exl2)
        return make_plan(PlanInputs(gpu.snapshot(), (request,), GpuPolicy(), estimators))

    return plan_load


@pytest.mark.parametrize("policy", ["step_down", "wait", "fail"])
def test_no_room_for_a_planned_model_steps_down_waits_or_fails_per_policy(policy):
    model = ["/m/q6.gguf", "/m/q4.gguf"]
    big = {"kind": "llamacpp", "n_gpu_layers": "auto", "model": model, "standby": "cold", "on_no_room": policy}
    engines = {"held": {**FAKE, "gpu_mib": 2000, "pinned": True}, "big": big}
    core, gpu = core_with(engines, 4096)
    variants = [fx.gguf("/m/q6.gguf", 2500), fx.gguf("/m/q4.gguf", 1900)]
    core.effects.planners["big"] = _planned(gpu, variants, **big)
    core.submit("h", engine="held")
    gpu.load("held", 2000)
    core.finish_current("held")
    core.submit("r", engine="big")
    if policy == "step_down":
        assert core.effects.named("start") == ["held.1", "big.1"]
        chosen = core.engine("big").chosen
        assert chosen is not None and chosen.key != core.engine("big").plan.engines[0].candidates[0].key
    elif policy == "wait":
        assert core.effects.named("start") == ["held.1"] and core.terminal("r") == []
        assert core.engine("big").residency.waiting.startswith("waiting for GPU memory: needs ")
    else:
        (end,) = core.terminal("r")
        assert end["code"] == p.ErrorCode.INSUFFICIENT_MEMORY


# --- several GPUs, neighbours ------------------------------------------------------------------------------


def test_with_two_gpus_a_model_goes_to_the_one_with_room_and_sees_only_it():
    engines = {"a": {**FAKE, "gpu_mib": 6000}, "b": {**FAKE, "gpu_mib": 6000}}
    core, gpu = core_with(engines, 8000, 8000)
    gpu.neighbours[0] = 3000
    core.submit("a1", engine="a")
    assert core.effects.launches[-1].devices == (1,)
    gpu.load("a", 6000)
    gpu.neighbours[0] = 1000
    core.submit("b1", engine="b")
    assert core.effects.launches[-1].devices == (0,) and core.effects.named("stop") == []


def test_a_neighbour_taking_memory_between_two_plans_is_counted_by_the_second():
    engines = {"a": {**FAKE, "gpu_mib": 6000, "keep_alive": 0, "on_no_room": "fail"}}
    core, gpu = core_with(engines, 10_000)
    core.submit("first", engine="a")
    gpu.load("a", 6000)
    core.finish_current("a")
    gpu.exit("a")  # keep_alive 0: unloaded after it
    gpu.neighbours[0] = 5000  # another service took half the card meanwhile
    core.submit("second", engine="a")
    (end,) = core.terminal("second")
    assert end["code"] == p.ErrorCode.INSUFFICIENT_MEMORY and "5000 MiB free" in end["message"]


# --- the unload op, exclusive ------------------------------------------------------------------------------


def test_unload_lets_running_and_queued_requests_finish_first():
    core, gpu = core_with({"a": FAKE}, 10_000)
    core.submit("r1", engine="a")
    core.submit("r2", engine="a")
    gpu.load("a", 1000)
    core.engines.request_unload(core.engine("a"), core.now)
    assert core.effects.named("stop") == []
    core.finish_current("a")
    assert core.effects.named("stop") == []
    core.finish_current("a")
    assert core.effects.named("stop") == ["a.1"] and unloads(core) == [("a", "requested")]
    assert [core.terminal(r)[0]["event"] for r in ("r1", "r2")] == ["done", "done"]


def test_an_exclusive_engine_stops_every_other_gpu_engine_first():
    engines = {"a": {**FAKE, "gpu_mib": 1000}, "x": {**FAKE, "gpu_mib": 1000, "exclusive": True}}
    core, gpu = core_with(engines, 10_000)
    core.submit("a1", engine="a")
    gpu.load("a", 1000)
    core.finish_current("a")
    core.submit("x1", engine="x")
    assert core.effects.named("stop") == ["a.1"] and unloads(core) == [("a", "evicted")]
    gpu.exit("a")
    assert core.effects.named("start") == ["a.1", "x.1"]


# --- keep_alive and the load/unload ops, as the protocol reads them ---------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [(None, None), (0, 0.0), (2.5, 2.5), ("300", 300.0), ("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), (-5, -1.0)],
)
def test_keep_alive_is_seconds_or_a_duration_and_negative_means_for_ever(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", [True, [1], {"s": 1}, "soon", "5 minutes", 10**9])
def test_a_keep_alive_of_the_wrong_type_or_size_is_refused_naming_the_field(value):
    with pytest.raises(InvalidMessage) as refused:
        parse_keep_alive(value)
    assert refused.value.code == p.ErrorCode.INVALID_REQUEST and refused.value.message.startswith("keep_alive: ")


def test_load_and_unload_ops_name_their_bad_fields():
    assert parse_load({"op": "load", "id": "1", "engine": "a", "keep_alive": "1m"}) == ("a", 60.0)
    assert parse_unload({"op": "unload", "id": "1", "all": True}) is None
    for message, field in [
        ({"op": "load", "id": "1"}, "engine"),
        ({"op": "load", "id": "1", "engine": "a", "pinned": True}, "pinned"),
        ({"op": "unload", "id": "1"}, "engine"),
        ({"op": "unload", "id": "1", "engine": "a", "all": True}, "engine"),
        ({"op": "unload", "id": "1", "all": "yes"}, "all"),
    ]:
        with pytest.raises(InvalidMessage) as refused:
            (parse_load if message["op"] == "load" else parse_unload)(message)
        assert refused.value.message.startswith(f"{field}: "), refused.value.message


def test_a_neighbour_growing_past_the_reserve_is_published_once_and_nothing_is_killed():
    engines = {"a": {**FAKE, "gpu_mib": 4000}}
    core, gpu = core_with(engines, 10_000, reserve_mib=1000)
    core.submit("r", engine="a")
    gpu.load("a", 4000)
    core.finish_current("a")
    heard(core, 10)
    assert core.effects.topics("gpu.pressure") == []
    gpu.neighbours[0] = 5500  # 500 MiB free: 500 short of the reserve
    heard(core, 30)
    (pressure,) = core.effects.topics("gpu.pressure")
    assert (pressure["device"], pressure["short_mib"]) == (0, 500)
    assert core.effects.named("kill") == [] and core.effects.named("stop") == []
