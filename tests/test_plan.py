"""The GPU planner (planning/decide/plan.py): recorded shapes and snapshots in, choices and reasons out.

The estimate is the simple stand-in of tests/plan_fixtures.py (weights by layer
bytes, KV cache by formula), so these tests pin the planner's logic, not the
estimator's calibration.  Policy: 10 % margin and 600 MiB CUDA overhead, the
defaults, unless a test says otherwise.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from supervisor.config import EngineConfig, GpuConfig, load_settings
from supervisor.planning.decide.plan import engine_request, plan, replan_after_oom
from supervisor.planning.decide.types import EngineRequest, Estimators, GpuPolicy
from supervisor.planning.decide.search import ctx_steps

from .plan_fixtures import (
    MIB,
    Q3_K_M,
    Q4_K_M,
    Q6_K,
    QWEN_3B,
    QWEN_7B,
    EXL2_CALLS,
    device,
    estimate_exl2,
    estimate_llamacpp,
    exl2,
    snapshot,
)

ESTIMATORS = Estimators(llamacpp=estimate_llamacpp, exl2=estimate_exl2)
POLICY = GpuPolicy()


def request(name: str = "llama", variants=QWEN_3B, n_ctx: int = 32768, **fields) -> EngineRequest:
    return EngineRequest(name, tuple(variants), n_ctx, **fields)


def needs_mib(facts, n_ctx: int, layers: int = -1, cache: str = "f16") -> float:
    """What the planner should find a candidate needs, for checking its arithmetic."""
    return POLICY.needs(estimate_llamacpp(facts, layers, n_ctx, cache).gpu_bytes) / MIB


def test_twelve_gb_card_with_neighbours_gets_the_best_variant_whole_at_the_requested_context():
    """5 GB used by translation and speech leaves ~7 GB: Q6_K at 32k needs ~5.9 GB with margin and CUDA context."""
    chosen_plan = plan(snapshot(device(0, 12288, neighbours_mib=5120)), [request()], POLICY, ESTIMATORS)
    engine = chosen_plan.engine("llama")
    chosen = engine.chosen
    assert (chosen.path, chosen.layers_text, chosen.n_ctx, chosen.cache_type, chosen.device) == (
        Q6_K.path,
        "all",
        32768,
        "f16",
        0,
    )
    assert chosen.gpu_bytes / MIB == pytest.approx(needs_mib(Q6_K, 32768), abs=1)
    assert engine.device.available_bytes == (12288 - 5120) * MIB and chosen.fits
    assert len(engine.candidates) == 1  # the first candidate fitted: nothing else weighed
    assert any("n_ctx 32768 as requested" in r for r in engine.reasons) and any(
        "GPU 0" in r and "7168 MiB available" in r for r in engine.reasons
    )
    assert engine.warnings == ()


def test_eight_gb_card_steps_the_context_down_and_then_fits_it_as_large_as_it_goes():
    engine = plan(snapshot(device(0, 8192, neighbours_mib=4096)), [request()], POLICY, ESTIMATORS).engine("llama")
    chosen = engine.chosen
    assert chosen.path == Q6_K.path and chosen.layers_text == "all" and chosen.cache_type == "f16"
    steps = [c.n_ctx for c in engine.candidates]
    assert steps[:3] == [32768, 16384, 8192] and not any(c.fits for c in engine.candidates[:3])
    # 4096 fits; the widening finds the largest multiple of 256 below 8192 that fits too.
    assert 4096 < chosen.n_ctx < 8192 and chosen.n_ctx % 256 == 0 and chosen.step.endswith("fitted")
    assert needs_mib(Q6_K, chosen.n_ctx) <= 4096 < needs_mib(Q6_K, chosen.n_ctx + 256)
    assert any(
        f"instead of the requested 32768: 32768 needs {round(needs_mib(Q6_K, 32768))} MiB" in r for r in engine.reasons
    )


def test_min_ctx_keeps_the_context_so_the_next_variant_is_taken():
    engine = plan(
        snapshot(device(0, 8192, neighbours_mib=4096)), [request(n_ctx=8192, min_ctx=8192)], POLICY, ESTIMATORS
    ).engine("llama")
    assert engine.chosen.path == Q4_K_M.path and engine.chosen.n_ctx == 8192 and engine.chosen.layers_text == "all"
    assert [c.path for c in engine.candidates] == [Q6_K.path, Q4_K_M.path]
    assert any("the better ones do not fit (qwen2.5-3b-instruct-q6_k.gguf needs at least" in r for r in engine.reasons)


def test_a_smaller_kv_cache_type_comes_before_the_next_variant_when_allowed():
    fits_q8_only = round((needs_mib(Q6_K, 32768) + needs_mib(Q6_K, 32768, cache="q8_0")) / 2)
    engine = plan(
        snapshot(device(0, fits_q8_only)), [request(min_ctx=32768, cache_types=("f16", "q8_0"))], POLICY, ESTIMATORS
    ).engine("llama")
    assert (engine.chosen.path, engine.chosen.n_ctx, engine.chosen.cache_type) == (Q6_K.path, 32768, "q8_0")
    assert any("q8_0 KV cache: with f16 it does not fit even at n_ctx 32768" in r for r in engine.reasons)
    without = plan(snapshot(device(0, fits_q8_only)), [request(min_ctx=32768)], POLICY, ESTIMATORS).engine("llama")
    assert without.chosen.path == Q4_K_M.path and without.chosen.cache_type == "f16"


def test_twenty_four_gb_card_fits_every_engine_whole():
    requests = [request("a"), request("b", variants=(QWEN_7B,), n_ctx=16384)]
    result = plan(
        snapshot(device(0, 24576, neighbours_mib=1024, name="NVIDIA GeForce RTX 4090")), requests, POLICY, ESTIMATORS
    )
    for engine, path, n_ctx in ((result.engine("a"), Q6_K.path, 32768), (result.engine("b"), QWEN_7B.path, 16384)):
        assert (engine.chosen.path, engine.chosen.layers_text, engine.chosen.n_ctx) == (path, "all", n_ctx)


def test_two_gpus_the_one_with_the_most_available_is_chosen():
    gpus = snapshot(
        device(0, 8192, neighbours_mib=6000), device(1, 12288, neighbours_mib=2048, name="NVIDIA RTX A2000")
    )
    engine = plan(gpus, [request()], POLICY, ESTIMATORS).engine("llama")
    assert engine.chosen.device == 1 and engine.device.index == 1 and engine.chosen.n_ctx == 32768
    assert any(r.startswith("GPU 1 (NVIDIA RTX A2000)") and "the most of 2 GPUs" in r for r in engine.reasons)


def test_no_gpu_plans_the_cpu_with_the_probes_reason():
    reason = "NVML: driver not loaded (libnvidia-ml.so.1 not found)"
    result = plan(
        snapshot(reason=reason),
        [request(), request("exl2", variants=(exl2("qwen-3b-exl2-6.0bpw", 2540, 6.0),))],
        POLICY,
        ESTIMATORS,
    )
    engine = result.engine("llama")
    assert (engine.chosen.path, engine.chosen.n_gpu_layers, engine.chosen.device, engine.chosen.n_ctx) == (
        Q6_K.path,
        0,
        None,
        32768,
    )
    assert engine.device is None and result.gpu_reason == reason
    assert any(r == f"CPU: no usable GPU ({reason})" for r in engine.reasons)
    assert engine.chosen.ram_bytes >= Q6_K.file_bytes
    exl2_engine = result.engine("exl2")
    assert exl2_engine.chosen is None and exl2_engine.reasons == (
        f"ExLlamaV2 needs a GPU and none is usable: {reason}",
    )


def test_a_model_that_fits_only_partially_gets_the_most_layers_that_fit():
    engine = plan(
        snapshot(device(0, 4096, neighbours_mib=1024)),
        [request(variants=(QWEN_7B,), n_ctx=4096, min_ctx=4096)],
        POLICY,
        ESTIMATORS,
    ).engine("llama")
    chosen = engine.chosen
    assert 0 < chosen.n_gpu_layers < QWEN_7B.n_layer and chosen.step == "partial" and chosen.fits
    assert needs_mib(QWEN_7B, 4096, chosen.n_gpu_layers) <= 3072 < needs_mib(QWEN_7B, 4096, chosen.n_gpu_layers + 1)
    one_more = engine.candidates[-1]
    assert one_more.n_gpu_layers == chosen.n_gpu_layers + 1 and not one_more.fits
    assert chosen.layers_text == f"{chosen.n_gpu_layers}/29"
    assert any(f"{chosen.layers_text} layers on the GPU: the most that fit" in r for r in engine.reasons)
    assert 0 < chosen.ram_bytes < QWEN_7B.file_bytes


def test_not_even_one_layer_fits_so_the_cpu_serves_and_says_so():
    engine = plan(snapshot(device(0, 2048, neighbours_mib=1400)), [request()], POLICY, ESTIMATORS).engine("llama")
    assert engine.chosen.n_gpu_layers == 0 and engine.chosen.step == "cpu"
    assert [c.n_gpu_layers for c in engine.candidates if c.step == "partial"] == [1, 1, 1]  # one row per variant
    assert any(r.startswith("CPU: not even one layer fits on GPU 0 (648 MiB available)") for r in engine.reasons)


def test_a_neighbour_growing_between_two_restarts_steps_the_plan_down():
    """Our worker (pid 4242) holds its memory while it restarts: that memory counts
    as available to it.  The neighbour's growth does not."""
    running = needs_mib(Q6_K, 32768)
    before = snapshot(device(0, 12288, neighbours_mib=5120, own={4242: int(running)}))
    first = plan(before, [request(own_pids=frozenset({4242}))], POLICY, ESTIMATORS).engine("llama")
    assert (first.chosen.path, first.chosen.n_ctx) == (Q6_K.path, 32768)
    assert first.device.own_bytes == int(running) * MIB and any(
        "held by this engine's own worker" in r for r in first.reasons
    )
    strangers = plan(before, [request()], POLICY, ESTIMATORS).engine("llama")  # not this engine's pid: not its to reuse
    assert strangers.device.available_bytes == first.device.available_bytes - int(running) * MIB
    assert strangers.chosen.key != first.chosen.key
    grown = snapshot(device(0, 12288, neighbours_mib=7168, own={4242: int(running)}))
    second = plan(grown, [request(own_pids=frozenset({4242}))], POLICY, ESTIMATORS).engine("llama")
    assert second.device.available_bytes == first.device.available_bytes - 2048 * MIB
    assert second.chosen.path == Q6_K.path and second.chosen.n_ctx < 32768


def test_explicit_n_gpu_layers_is_kept_and_only_reported():
    small = snapshot(device(0, 4096, neighbours_mib=2048))
    engine = plan(small, [request(n_gpu_layers=30)], POLICY, ESTIMATORS).engine("llama")
    assert (engine.chosen.n_gpu_layers, engine.chosen.path, engine.chosen.n_ctx, engine.chosen.step) == (
        30,
        Q6_K.path,
        32768,
        "explicit",
    )
    assert not engine.chosen.fits and len(engine.candidates) == 1
    assert any("n_gpu_layers = 30 needs" in w and "will likely run out of memory" in w for w in engine.warnings)
    assert any("n_gpu_layers = 30 as configured" in r for r in engine.reasons)
    fits = plan(snapshot(device(0, 24576)), [request(n_gpu_layers=-1)], POLICY, ESTIMATORS).engine("llama")
    assert fits.chosen.layers_text == "all" and fits.chosen.fits and fits.warnings == ()
    cpu = plan(small, [request(n_gpu_layers=0)], POLICY, ESTIMATORS).engine("llama")
    assert cpu.chosen.device is None and cpu.chosen.fits and "CPU: n_gpu_layers = 0 in the config" in cpu.reasons
    no_gpu = plan(snapshot(reason="no NVIDIA driver"), [request(n_gpu_layers=-1)], POLICY, ESTIMATORS).engine("llama")
    assert not no_gpu.chosen.fits and any("no usable GPU (no NVIDIA driver)" in w for w in no_gpu.warnings)


def test_replan_after_oom_never_repeats_a_candidate_and_ends_on_the_cpu_then_nothing():
    current = plan(snapshot(device(0, 12288, neighbours_mib=5120)), [request(), request("other")], POLICY, ESTIMATORS)
    other = current.engine("other")
    seen, needs = [current.engine("llama").chosen.key], [current.engine("llama").chosen.gpu_bytes]
    for _ in range(60):
        current = replan_after_oom(current, "llama")
        engine = current.engine("llama")
        if engine.chosen is None or engine.chosen.n_gpu_layers == 0:
            break
        assert engine.chosen.key not in seen and engine.chosen.fits
        assert engine.chosen.gpu_bytes <= needs[-1] * (1 - POLICY.safety_margin)  # a real step down, not a near twin
        seen.append(engine.chosen.key)
        needs.append(engine.chosen.gpu_bytes)
    assert engine.chosen is not None and engine.chosen.n_gpu_layers == 0, engine.reasons
    assert any("out-of-memory load(s)" in r for r in engine.reasons) and any(
        r.startswith("CPU: nothing smaller") for r in engine.reasons
    )
    steps = [c.step for c in engine.failed]
    assert steps[0] == "requested" and "partial" in steps
    assert any(s.startswith("smaller context") for s in steps) and any(s.startswith("next variant") for s in steps)
    assert len(engine.failed) == len(seen)
    last = replan_after_oom(current, "llama").engine("llama")
    assert last.chosen is None and last.reasons == (
        "nothing smaller is left after the out-of-memory load(s), the CPU included",
    )
    assert current.engine("other") == other  # only the engine that failed is replanned


def test_replan_after_oom_with_an_explicit_value_keeps_it_and_says_how_to_let_it_step_down():
    first = plan(snapshot(device(0, 24576)), [request(n_gpu_layers=-1)], POLICY, ESTIMATORS)
    engine = replan_after_oom(first, "llama").engine("llama")
    assert engine.chosen is None and 'n_gpu_layers = "auto"' in engine.reasons[0]


def test_replan_takes_a_fresh_snapshot():
    first = plan(snapshot(device(0, 24576)), [request()], POLICY, ESTIMATORS)
    after = replan_after_oom(first, "llama", snapshot(device(0, 24576, neighbours_mib=20000)))
    assert (
        after.engine("llama").device.available_bytes == 4576 * MIB
        and after.inputs.snapshot.devices[0].used_bytes == 20000 * MIB
    )


def test_reserve_and_percent_are_held_back_and_margin_and_overhead_added():
    policy = GpuPolicy(reserve_bytes=1024 * MIB, reserve_percent=10, safety_margin=0.2, cuda_overhead_bytes=500 * MIB)
    engine = plan(snapshot(device(0, 10240, neighbours_mib=2048)), [request()], policy, ESTIMATORS).engine("llama")
    assert engine.device.reserve_bytes == 2048 * MIB and engine.device.available_bytes == (10240 - 2048 - 2048) * MIB
    estimate = estimate_llamacpp(Q6_K, -1, engine.chosen.n_ctx).gpu_bytes
    assert engine.chosen.gpu_bytes == int(estimate * 1.2) + 500 * MIB
    assert any("- 2048 reserved" in r for r in engine.reasons)


def test_exl2_variants_use_their_cache_names_and_never_go_partial():
    variants = (exl2("qwen-3b-exl2-6.0bpw", 2540, 6.0), exl2("qwen-3b-exl2-4.0bpw", 1700, 4.0))
    EXL2_CALLS.clear()
    engine = plan(
        snapshot(device(0, 4096, neighbours_mib=1024)),
        [request("x", variants=variants, n_ctx=4096, cache_types=("f16", "q8_0", "q4_0"))],
        POLICY,
        ESTIMATORS,
    ).engine("x")
    assert set(EXL2_CALLS) <= {"fp16", "q8", "q4"} and "fp16" in EXL2_CALLS
    assert engine.chosen is not None and engine.chosen.layers_text == "all"
    tiny = plan(snapshot(device(0, 1024)), [request("x", variants=variants, n_ctx=4096)], POLICY, ESTIMATORS).engine(
        "x"
    )
    assert tiny.chosen is None and tiny.reasons[0].startswith(
        "ExLlamaV2 loads the whole model onto one GPU and no variant fits"
    )
    assert all(c.step != "partial" for c in tiny.candidates)


def test_an_exl2_engine_is_planned_even_with_the_default_n_gpu_layers():
    engine = plan(
        snapshot(device(0, 24576)), [request(variants=(exl2("e", 2540, 6.0),), n_gpu_layers=0)], POLICY, ESTIMATORS
    ).engine("llama")
    assert engine.chosen.layers_text == "all" and engine.chosen.device == 0


def test_no_readable_variant_plans_nothing_and_keeps_the_notes():
    engine = plan(
        snapshot(device(0, 8192)),
        [request(variants=(), notes=("variant /x.gguf skipped: no such file",))],
        POLICY,
        ESTIMATORS,
    ).engine("llama")
    assert engine.chosen is None and engine.reasons == ("no model variant could be read",)
    assert engine.warnings == ("variant /x.gguf skipped: no such file",)


def test_ram_shortage_is_a_warning():
    result = plan(snapshot(reason="no GPU"), [request()], POLICY, ESTIMATORS, ram_available_bytes=1024 * MIB)
    assert any("MiB of RAM, 1024 MiB available" in w for w in result.engine("llama").warnings)


@pytest.mark.parametrize(
    "n_ctx, min_ctx, steps",
    [
        (8192, 512, [8192, 4096, 2048, 1024, 512]),
        (3000, 512, [3000, 1500, 750, 512]),
        (256, 512, [256]),
        (512, 512, [512]),
    ],
)
def test_context_steps(n_ctx, min_ctx, steps):
    assert ctx_steps(n_ctx, min_ctx) == steps


def test_engine_request_from_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "[gpu]\nreserve_mib = 1500\nmin_ctx = 1024\n"
        '[engines.a]\nkind = "llamacpp"\nmodel = ["/m/q6.gguf", "/m/q4.gguf"]\nn_gpu_layers = "auto"\ncache_type = "q8_0"\n'
        'cache_types_allowed = ["f16", "q4_0"]\noptions = { n_batch = 256 }\n'
    )
    settings = load_settings(path)
    req = engine_request("a", settings.engines["a"], [Q6_K, Q4_K_M], settings.gpu.min_ctx, frozenset({7}))
    assert (req.cache_types, req.min_ctx, req.n_gpu_layers, req.n_batch, req.n_ubatch, req.own_pids) == (
        ("q8_0", "q4_0"),
        1024,
        "auto",
        256,
        512,
        {7},
    )
    policy = GpuPolicy.from_config(settings.gpu)
    assert (policy.reserve_bytes, policy.safety_margin, policy.cuda_overhead_bytes) == (1500 * MIB, 0.10, 600 * MIB)
    assert GpuPolicy.from_config(GpuConfig(), reserve_mib=100).reserve_bytes == 100 * MIB
    assert replace(req, variants=(Q3_K_M,)).variants == (Q3_K_M,)


def test_engine_request_batch_sizes_from_the_keys_before_the_options():
    """The planner estimates with the batch sizes the worker loads with: the key, else the option, else 512."""
    keyed = engine_request(
        "a",
        EngineConfig(kind="llamacpp", n_batch=1024, n_ubatch=256, options={"n_batch": 64, "n_ubatch": 32}),
        [Q4_K_M],
        512,
    )
    assert (keyed.n_batch, keyed.n_ubatch) == (1024, 256)
    optioned = engine_request("a", EngineConfig(kind="llamacpp", options={"n_ubatch": 128}), [Q4_K_M], 512)
    assert (optioned.n_batch, optioned.n_ubatch) == (512, 128)


def test_parallel_requests_each_get_the_context_so_the_cache_is_planned_for_all_of_them():
    """parallel = 4 holds n_ctx for each of four sequences: what fits one at 32k on the 12 GB card does not fit four."""
    assert engine_request("a", EngineConfig(kind="llamacpp", parallel=4), [Q4_K_M], 512).sequences == 4
    assert (
        engine_request("x", EngineConfig(kind="exllamav2", parallel=4), [Q4_K_M], 512).sequences == 1
    )  # one request at a time there
    alone = (
        plan(snapshot(device(0, 12288, neighbours_mib=5120)), [request()], POLICY, ESTIMATORS).engine("llama").chosen
    )
    four = (
        plan(snapshot(device(0, 12288, neighbours_mib=5120)), [request(sequences=4)], POLICY, ESTIMATORS)
        .engine("llama")
        .chosen
    )
    assert (alone.n_ctx, alone.path) == (32768, Q6_K.path)
    facts = next(f for f in QWEN_3B if f.path == four.path)
    assert four.gpu_bytes / MIB == pytest.approx(
        needs_mib(facts, four.n_ctx * 4, four.n_gpu_layers, four.cache_type), abs=1
    )
    assert (four.path, four.n_ctx) != (alone.path, alone.n_ctx)  # a smaller variant or context, for the 4x cache
