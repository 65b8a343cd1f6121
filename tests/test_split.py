"""Several GPUs, driven in-process: a model that fits on no single device is split across
several in proportion to their room, eviction for a split, on_no_room for a split that
cannot fit, and loads serialized per device (recorded GPU figures, a manual clock).

Then what the workers make of a split (LoadSpec.split_mib): llama.cpp's tensor_split and
main_gpu, ExLlamaV2's gpu_split, as unit tests of their standard-library helpers (no GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from supervisor.core.lifecycle import WorkerState
from supervisor.core.placement import GpuRoom, Holder, place
from supervisor.io.worker_process import WorkerProcess
from supervisor.planning.decide.plan import plan
from supervisor.planning.decide.split import split_across
from supervisor.planning.decide.types import EngineRequest, Estimators, GpuPolicy
from supervisor.planning.measure.inputs import worker_gpu_bytes
from workers import protocol as p
from workers.exllamav2.split import gpu_split, weights_bytes
from workers.llamacpp.settings import split_kwargs
from workers.protocol.messages import LoadSpec, ProtocolError

from . import plan_fixtures as fx
from .test_placement import FAKE, core_with, unloads

MIB = 1 << 20


def spec_sent(core: Any, name: str) -> LoadSpec:
    """The LoadSpec the daemon sent the engine's worker, read back from the wire."""
    (load,) = core.effects.worker_messages(core.engine(name).worker.worker_id, "load")
    return LoadSpec.from_wire(load["spec"])


def one_terminal_each(core: Any, *rids: str) -> list[bool]:
    return [[e["event"] for e in core.terminal(rid)] == ["done"] for rid in rids]


# --- the pure decision ------------------------------------------------------------------------------


def test_a_split_takes_the_fewest_roomiest_devices_in_proportion_to_their_room():
    room = {0: 6000 * MIB, 1: 3000 * MIB, 2: 1000 * MIB}
    split = split_across(8000 * MIB, room)
    assert split is not None and split.devices == (0, 1) and split.total == 8000 * MIB
    assert split.shares[0] / split.shares[1] == pytest.approx(2.0, rel=1e-6)
    assert all(share <= room[d] for d, share in zip(split.devices, split.shares))
    # Each device after the first costs a CUDA context more: 9500 + 2 x 600 is more than all three hold.
    assert split_across(9500 * MIB, room, 600 * MIB) is None
    assert split_across(9500 * MIB, room).devices == (0, 1, 2)
    assert split_across(500 * MIB, {0: 1000 * MIB}) is None  # one device is never a split


def test_a_model_that_fits_on_one_device_is_never_split():
    room = GpuRoom({0: 3000 * MIB, 1: 6000 * MIB})
    decision = place(5000 * MIB, room, [], split=True)
    assert (decision.kind, decision.devices, decision.shares) == ("fit", (1,), (5000 * MIB,))
    # One device after eviction is still preferred to a split without it.
    idle = Holder("idle", {1: 2000 * MIB}, last_used_at=1.0, evictable=True)
    decision = place(8000 * MIB, room, [idle], split=True)
    assert (decision.kind, decision.devices, decision.victims) == ("evict", (1,), ("idle",))


def test_the_planner_splits_a_model_that_fits_whole_on_no_single_device_before_stepping_down():
    estimators = Estimators(fx.estimate_llamacpp, fx.estimate_exl2)
    policy = GpuPolicy()
    need = policy.needs(fx.estimate_llamacpp(fx.QWEN_7B, -1, 8192).gpu_bytes) // MIB
    devices = fx.snapshot(fx.device(0, need * 7 // 10), fx.device(1, need * 6 // 10))
    split = plan(devices, [EngineRequest("m", (fx.QWEN_7B,), 8192, split=True)], policy, estimators).engine("m")
    chosen = split.chosen
    assert chosen is not None and chosen.step == "split" and chosen.layers_text == "all" and chosen.n_ctx == 8192
    assert chosen.devices == (0, 1) and sum(chosen.device_bytes) == chosen.gpu_bytes + policy.cuda_overhead_bytes
    assert chosen.device_bytes[0] / chosen.device_bytes[1] == pytest.approx(7 / 6, rel=0.01)
    assert split.reasons[0].startswith("split across GPUs 0+1")
    never = plan(devices, [EngineRequest("m", (fx.QWEN_7B,), 8192)], policy, estimators).engine("m").chosen
    assert never is not None and never.devices == () and never.device == 0 and never.step != "split"


# --- the core: split, eviction, on_no_room ------------------------------------------------------------------


def test_a_model_bigger_than_any_one_gpu_is_split_in_proportion_to_free_memory():
    core, gpu = core_with({"big": {**FAKE, "gpu_mib": 9000}}, 8000, 8000, cuda_overhead_mib=0)
    gpu.neighbours[0], gpu.neighbours[1] = 2000, 4000  # 6000 and 4000 MiB free: 9000 fits on neither
    core.submit("r", engine="big")
    (launch,) = core.effects.launches
    assert launch.devices == (0, 1)
    environ = WorkerProcess(launch, ["true"], {}, lambda *_: None)._environ
    assert environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    (load,) = core.effects.topics("engine.load")
    assert (load["devices"], load["device_mib"]) == ([0, 1], [5400, 3600])
    pid = gpu.load("big", 9000)
    assert spec_sent(core, "big").split_mib == (5400, 3600)
    residency = core.engine("big").describe_residency(core.now)
    assert (residency["devices"], residency["device_mib"]) == ([0, 1], [5400, 3600])
    # What it holds is measured per device and summed for the model.
    assert gpu.room().held_by(pid) == {0: 5400 * MIB, 1: 3600 * MIB}
    assert worker_gpu_bytes(gpu.snapshot(), pid) == 9000 * MIB
    core.finish_current("big")
    assert one_terminal_each(core, "r") == [True]


def test_a_model_that_fits_on_one_gpu_is_placed_there_and_sent_no_split():
    core, gpu = core_with({"m": {**FAKE, "gpu_mib": 7000}}, 8000, 8000)
    gpu.neighbours[0] = 4000
    core.submit("r", engine="m")
    assert core.effects.launches[-1].devices == (1,)
    gpu.load("m", 7000)
    assert spec_sent(core, "m").split_mib == ()


def test_idle_models_are_evicted_to_make_room_for_a_split_only_as_far_as_needed():
    engines = {name: {**FAKE, "gpu_mib": 6000} for name in "abd"} | {"c": {**FAKE, "gpu_mib": 12_000}}
    core, gpu = core_with(engines, 8000, 8000, 8000, cuda_overhead_mib=0)
    for name in "abd":  # one on each GPU, used in this order: a is the least recently used
        core.submit(f"{name}1", engine=name)
        gpu.load(name, 6000)
        core.advance(1)
        core.finish_current(name)
    assert [x.devices for x in core.effects.launches] == [(0,), (1,), (2,)]
    core.submit("c1", engine="c")
    # Evicting a leaves 8000 + 2000 + 2000: enough across the three, so b and d stay.
    assert core.effects.named("stop") == ["a.1"] and unloads(core) == [("a", "evicted")]
    assert core.engine("c").residency.waiting.startswith("evicting a to make room")
    gpu.exit("a")
    assert core.effects.launches[-1].devices == (0, 1, 2)
    gpu.load("c", 12_000)
    assert spec_sent(core, "c").split_mib == (8000, 2000, 2000)
    core.finish_current("c")
    assert one_terminal_each(core, "a1", "b1", "d1", "c1") == [True] * 4


@pytest.mark.parametrize("policy", ["fail", "wait"])
def test_a_split_that_cannot_fit_even_after_eviction_follows_on_no_room(policy):
    engines = {
        "held": {**FAKE, "gpu_mib": 5000, "pinned": True},
        "big": {**FAKE, "gpu_mib": 12_000, "on_no_room": policy},
    }
    core, gpu = core_with(engines, 8000, 8000, cuda_overhead_mib=0, no_room_wait_s=30)
    core.submit("h", engine="held")
    gpu.load("held", 5000)
    core.finish_current("held")
    core.submit("r", engine="big")
    expected = "needs 12000 MiB, 11000 MiB free across 2 GPUs"
    if policy == "wait":
        assert core.terminal("r") == [] and core.engine("big").residency.waiting.endswith(expected)
        core.advance(30)
    (end,) = core.terminal("r")
    assert end["code"] == p.ErrorCode.INSUFFICIENT_MEMORY and expected in end["message"]
    assert core.effects.named("start") == ["held.1"] and core.effects.named("stop") == []


def test_split_never_keeps_a_model_on_one_gpu():
    core, _ = core_with({"m": {**FAKE, "gpu_mib": 9000, "split": "never", "on_no_room": "fail"}}, 8000, 8000)
    core.submit("r", engine="m")
    (end,) = core.terminal("r")
    assert end["code"] == p.ErrorCode.INSUFFICIENT_MEMORY and "needs 9000 MiB, 8000 MiB free" in end["message"]


def test_a_reload_that_changes_split_reloads_the_model():
    core, _ = core_with({"m": {**FAKE, "gpu_mib": 1000}}, 8000, 8000)
    changes = core.reload({"m": {**FAKE, "gpu_mib": 1000, "split": "never"}}, gpu={"min_residency_s": 0})
    assert changes.restarted == ["m"]


# --- loads serialized per GPU ------------------------------------------------------------------------------


def test_loads_on_two_different_gpus_both_start_before_either_is_ready():
    core, gpu = core_with({"a": {**FAKE, "gpu_mib": 6000}, "b": {**FAKE, "gpu_mib": 6000}}, 8000, 8000)
    core.submit("ra", engine="a")
    core.submit("rb", engine="b")
    assert core.effects.named("start") == ["a.1", "b.1"]
    assert [x.devices for x in core.effects.launches] == [(0,), (1,)]
    assert core.engine("a").worker.state is core.engine("b").worker.state is WorkerState.SPAWNING
    gpu.load("b", 6000)
    gpu.load("a", 6000)
    core.finish_current("a")
    core.finish_current("b")
    assert one_terminal_each(core, "ra", "rb") == [True, True]


def test_two_loads_on_one_gpu_start_one_after_the_other():
    core, gpu = core_with({"a": {**FAKE, "gpu_mib": 4000}, "b": {**FAKE, "gpu_mib": 4000}}, 10_000)
    core.submit("ra", engine="a")
    core.submit("rb", engine="b")
    assert core.effects.named("start") == ["a.1"]
    assert core.engine("b").residency.waiting == "waiting for a to finish loading or unloading"
    gpu.load("a", 4000)
    assert core.effects.named("start") == ["a.1", "b.1"] and core.effects.launches[-1].devices == (0,)
    gpu.load("b", 4000)
    core.finish_current("a")
    core.finish_current("b")
    assert one_terminal_each(core, "ra", "rb") == [True, True]


def test_a_split_load_holds_all_its_gpus_and_a_cpu_load_waits_for_none():
    engines = {
        "big": {**FAKE, "gpu_mib": 12_000},
        "small": {**FAKE, "gpu_mib": 1000},
        "cpu": {**FAKE, "n_gpu_layers": 0},
    }
    core, gpu = core_with(engines, 8000, 8000)
    core.submit("r1", engine="big")
    core.submit("r2", engine="small")
    core.submit("r3", engine="cpu")
    assert core.effects.named("start") == ["big.1", "cpu.1"]  # small waits for both of big's devices
    assert core.effects.launches[0].devices == (0, 1) and core.effects.launches[1].devices is None
    gpu.load("big", 12_000)
    assert core.effects.named("start") == ["big.1", "cpu.1", "small.1"]
    gpu.load("small", 1000)
    core.bring_up("cpu")  # a CPU-only worker: NVML counts nothing for it
    for name in ("small", "cpu", "big"):
        core.finish_current(name)
    assert one_terminal_each(core, "r1", "r2", "r3") == [True] * 3


# --- what the workers make of a split -----------------------------------------------------------------------


def test_llamacpp_gets_tensor_split_in_the_planned_proportions_and_main_gpu_0():
    kwargs = split_kwargs(LoadSpec(model="m.gguf", n_gpu_layers=-1, split_mib=(6000, 3000, 1000)))
    assert kwargs == {"tensor_split": [0.6, 0.3, 0.1], "main_gpu": 0}
    assert split_kwargs(LoadSpec(model="m.gguf", n_gpu_layers=-1)) == {}
    assert split_kwargs(LoadSpec(model="m.gguf", split_mib=(5000,))) == {}


def test_the_split_goes_over_the_wire_as_a_list_and_comes_back_a_tuple():
    spec = LoadSpec(model="m", split_mib=(5400, 3600))
    assert spec.to_wire()["split_mib"] == [5400, 3600]
    assert LoadSpec.from_wire(spec.to_wire()) == spec
    with pytest.raises(ProtocolError, match="split_mib"):
        LoadSpec.from_wire({"model": "m", "split_mib": "5400,3600"})


def test_exllamav2_gets_a_gpu_split_in_gib_weights_in_proportion_and_the_last_device_its_whole_share(tmp_path: Path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "config.json").write_text("{}")
    assert weights_bytes(tmp_path) == 1000
    # 6144 + 4096 MiB planned, 5 GiB of weights: half of each share holds weights (+ scratch on the first).
    split = gpu_split((6144, 4096), 5 * 1024 * MIB)
    assert split == [3.5, 4.0]
    assert gpu_split((6144, 4096), 0) == [6.5, 4.0]  # weights unknown: the shares whole
    # Loading it needs CUDA (exllamav2 compiles its extension at import): not tested here.
