"""The memory estimate: unit rules with hand-made facts, then llama.cpp's own figures.

The acceptance tests load the default model (and a Q8_0 copy made here with
llama.cpp's quantizer) through the worker's own loader (workers/llamacpp/engine.py,
in the llamacpp environment) and compare the estimate with what llama.cpp
reports it allocated: model buffers, KV buffers, compute (and output) buffers.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from supervisor.planning.decide.estimate import (
    CACHE_TYPES,
    MIB,
    MemoryEstimate,
    estimate_exl2,
    estimate_llamacpp,
    place_layers,
)
from supervisor.planning.measure.model_facts import ModelFacts, read_model_facts
from tests.test_model_facts import DEFAULT_MODEL, REPO, TEST_STATE

LLAMA_PYTHON = TEST_STATE / "envs" / "llamacpp" / "bin" / "python"


def facts(**changes) -> ModelFacts:
    """A small Llama-like model: 4 blocks of 1, 2, 4, 8 MiB, untied output."""
    base = ModelFacts(
        path="hand-made",
        format="gguf",
        architecture="llama",
        n_layer=4,
        n_embd=1024,
        n_head=16,
        n_head_kv=4,
        head_dim_k=64,
        head_dim_v=64,
        n_ctx_train=4096,
        n_vocab=32000,
        sliding_window=None,
        swa_layers=0,
        file_type="Q8_0",
        file_bytes=200 * MIB,
        layer_bytes=(1 * MIB, 2 * MIB, 4 * MIB, 8 * MIB),
        token_embd_bytes=100 * MIB,
        output_bytes=50 * MIB,
        other_bytes=3 * MIB,
    )
    return replace(base, **changes)


# TinyLlama 1.1B's shape (docs/ENGINES.md): the H100 figures are for this shape.
LLAMA_1B = facts(
    n_layer=16,
    n_embd=2048,
    n_head=32,
    n_head_kv=8,
    n_vocab=32000,
    layer_bytes=(30 * MIB,) * 16,
    token_embd_bytes=35 * MIB,
    output_bytes=52 * MIB,
    other_bytes=8192,
)


# --- placement and weights ----------------------------------------------------


def test_layers_go_to_the_gpu_from_the_back_the_output_first():
    assert [place_layers(4, k).gpu_blocks for k in (0, 1, 2, 4, 5, 99, -1)] == [0, 0, 1, 3, 4, 4, 4]
    assert [place_layers(4, k).output_on_gpu for k in (0, 1, 2, -1)] == [False, True, True, True]


@pytest.mark.parametrize(
    ("n_gpu_layers", "gpu", "cpu"),
    [
        (0, 0, 1 + 2 + 4 + 8 + 100 + 50 + 3),
        (1, 50 + 3, 1 + 2 + 4 + 8 + 100),  # the output layer (and the final norm) alone
        (2, 8 + 50 + 3, 1 + 2 + 4 + 100),  # then the last block
        (4, 2 + 4 + 8 + 50 + 3, 1 + 100),  # n_layer leaves block 0 behind
        (5, 1 + 2 + 4 + 8 + 50 + 3, 100),  # n_layer + 1: everything but the input embedding
        (-1, 1 + 2 + 4 + 8 + 50 + 3, 100),
    ],
)
def test_partial_offload_puts_each_blocks_bytes_on_its_side(n_gpu_layers, gpu, cpu):
    est = estimate_llamacpp(facts(), n_gpu_layers, 2048)
    assert (est.weights_gpu, est.weights_cpu) == (gpu * MIB, cpu * MIB)


def test_a_tied_output_on_the_gpu_is_a_copy_of_token_embd():
    tied = facts(output_bytes=0)
    assert estimate_llamacpp(tied, 0, 2048).weights_cpu == (15 + 100 + 3) * MIB  # shared, counted once
    est = estimate_llamacpp(tied, 1, 2048)
    assert (est.weights_gpu, est.weights_cpu) == ((100 + 3) * MIB, (15 + 100) * MIB)


# --- KV cache -----------------------------------------------------------------


def test_kv_cache_size_follows_context_heads_and_type():
    # 4 layers x 2048 cells x 4 KV heads x (64 + 64) dims x 2 bytes
    f16 = estimate_llamacpp(facts(), 0, 2048).kv_cpu
    assert f16 == 4 * 2048 * 4 * 128 * 2
    assert estimate_llamacpp(facts(), 0, 4096).kv_cpu == 2 * f16
    assert estimate_llamacpp(facts(), 0, 2000).kv_cpu == f16  # n_ctx is padded to 256
    assert estimate_llamacpp(facts(n_head_kv=8), 0, 2048).kv_cpu == 2 * f16
    assert estimate_llamacpp(facts(), 0, 2048, "q8_0").kv_cpu == f16 * 17 // 32
    assert estimate_llamacpp(facts(), 0, 2048, "q4_0").kv_cpu == f16 * 9 // 32
    assert set(CACHE_TYPES) == {"f16", "q8_0", "q4_0"}
    with pytest.raises(ValueError, match="cache_type"):
        estimate_llamacpp(facts(), 0, 2048, "q5_1")


def test_kv_cache_lives_with_its_layer():
    total = estimate_llamacpp(facts(), 0, 2048).kv_cpu
    half = estimate_llamacpp(facts(), 3, 2048)  # the output and blocks 2, 3
    assert (half.kv_gpu, half.kv_cpu) == (total // 2, total // 2)
    full = estimate_llamacpp(facts(), -1, 2048)
    assert (full.kv_gpu, full.kv_cpu) == (total, 0)


def test_sliding_window_layers_cap_at_the_window_when_swa_full_is_off():
    swa = facts(n_layer=6, layer_bytes=(MIB,) * 6, sliding_window=512, swa_layers=5)
    per_cell_layer = 4 * 128 * 2
    for n_ctx in (8192, 16384):
        # 5 SWA layers keep pad(512 + n_ubatch 512, 256) = 1024 cells; the global one keeps n_ctx.
        assert estimate_llamacpp(swa, 0, n_ctx, swa_full=False).kv_cpu == (5 * 1024 + n_ctx) * per_cell_layer
        # llama.cpp's default (kept by llama-cpp-python, so by the worker): full-size SWA caches
        assert estimate_llamacpp(swa, 0, n_ctx).kv_cpu == 6 * n_ctx * per_cell_layer
    assert estimate_llamacpp(swa, 0, 512, swa_full=False).kv_cpu == 6 * 512 * per_cell_layer  # never above n_ctx
    assert estimate_llamacpp(swa, 0, 8192, n_ubatch=128, swa_full=False).kv_cpu == (5 * 768 + 8192) * per_cell_layer
    one = estimate_llamacpp(swa, 2, 8192, swa_full=False)  # the last block: the global one in llama.cpp's pattern
    assert one.kv_gpu == 8192 * per_cell_layer
    assert estimate_llamacpp(swa, 0, 8192, swa_full=False).compute_cpu < estimate_llamacpp(swa, 0, 8192).compute_cpu


def test_repacked_blocks_weigh_twice_in_ram_only_on_the_cpu():
    repacked = facts(layer_repack_bytes=(MIB // 2,) * 4)
    plain = estimate_llamacpp(facts(), 2, 2048)
    est = estimate_llamacpp(repacked, 2, 2048)  # blocks 0-2 on the CPU, block 3 on the GPU
    assert (est.weights_cpu - plain.weights_cpu, est.weights_gpu) == (3 * MIB // 2, plain.weights_gpu)
    assert estimate_llamacpp(repacked, 2, 2048, cpu_repack=False).weights_cpu == plain.weights_cpu


# --- compute buffers ----------------------------------------------------------


def test_compute_grows_with_context_and_batch_and_moves_with_the_layers():
    small, big = estimate_llamacpp(LLAMA_1B, 0, 2048), estimate_llamacpp(LLAMA_1B, 0, 8192)
    assert big.compute_cpu > 3 * small.compute_cpu  # attention scores are n_ctx x n_ubatch x n_head
    assert estimate_llamacpp(LLAMA_1B, 0, 8192, n_ubatch=128).compute_cpu < big.compute_cpu / 3
    gpu = estimate_llamacpp(LLAMA_1B, -1, 8192)
    assert gpu.compute_gpu > 500 * MIB and gpu.compute_cpu < 10 * MIB
    assert estimate_llamacpp(LLAMA_1B, 0, 8192, flash_attn=True).compute_cpu < big.compute_cpu / 4
    # a quantized V cache needs flash attention in llama.cpp, so it is estimated with it
    assert estimate_llamacpp(LLAMA_1B, 0, 8192, "q8_0").compute_cpu < big.compute_cpu / 4


@pytest.mark.parametrize(("n_ctx", "kv_mib", "compute_mib"), [(2048, 64, 150), (8192, 256, 546)])
def test_llama_1b_fully_offloaded_matches_the_h100_figures(n_ctx, kv_mib, compute_mib):
    """CUDA0 figures measured on an H100 (docs/ENGINES.md), 17 layers offloaded, f16 KV, batch 512."""
    est = estimate_llamacpp(LLAMA_1B, 17, n_ctx)
    assert est.kv_gpu == kv_mib * MIB and est.kv_cpu == 0
    assert abs(est.compute_gpu / MIB - compute_mib) <= 0.05 * compute_mib


def test_totals_add_up():
    est = estimate_llamacpp(facts(), 3, 4096)
    assert isinstance(est, MemoryEstimate)
    assert est.gpu_bytes == est.weights_gpu + est.kv_gpu + est.compute_gpu
    assert est.ram_bytes == est.weights_cpu + est.kv_cpu + est.compute_cpu


# --- ExLlamaV2 ----------------------------------------------------------------


def test_exl2_cache_types_and_weight_split():
    exl2 = facts(format="exl2", bits=4.0)
    fp16 = estimate_exl2(exl2, 4096)
    assert fp16.kv_gpu == 4096 * 4 * 4 * 128 * 2
    assert estimate_exl2(exl2, 4000).kv_gpu == fp16.kv_gpu  # rounded up to 256, as the worker does
    ratios = {t: estimate_exl2(exl2, 4096, t).kv_gpu / fp16.kv_gpu for t in ("q8", "q6", "q4")}
    assert ratios == pytest.approx({"q8": 17 / 32, "q6": 13 / 32, "q4": 9 / 32})
    assert (fp16.weights_gpu, fp16.weights_cpu) == ((1 + 2 + 4 + 8 + 50 + 3) * MIB, 100 * MIB)
    with pytest.raises(ValueError, match="cache_type"):
        estimate_exl2(exl2, 4096, "f16")


# --- against llama.cpp --------------------------------------------------------

_BUFFER = re.compile(r"(\S+)\s+(model|KV|output|compute) buffer size =\s+([\d.]+) MiB")
# The worker's own loader, run in the llamacpp environment: the settings measured are the daemon's.
_LOAD = """
import logging, sys
logging.basicConfig(level=logging.INFO)  # llama.cpp's buffer sizes are logged at info (workers/llamacpp/log.py)
sys.path.insert(0, sys.argv[1])
from workers.llamacpp.engine import create_engine
from workers.protocol.messages import LoadSpec
create_engine().load(LoadSpec(model=sys.argv[2], n_ctx=int(sys.argv[3]), n_gpu_layers=0), lambda f, m: None)
"""
_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread, p.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, 2, True
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""

needs_llamacpp = pytest.mark.usefixtures(
    "shared_state"
)  # the llama.cpp environment and the default model, made if missing


def reported(model: Path, n_ctx: int) -> dict[str, float]:
    """llama.cpp's own figures (MiB) for a CPU load by the worker's loader: weights, kv, compute."""
    proc = subprocess.run(
        [str(LLAMA_PYTHON), "-c", _LOAD, str(REPO), str(model), str(n_ctx)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = {"weights": 0.0, "kv": 0.0, "compute": 0.0}
    for _device, kind, mib in _BUFFER.findall(proc.stderr):
        figures[{"model": "weights", "KV": "kv"}.get(kind, "compute")] += float(mib)
    assert all(figures.values()), proc.stderr[-3000:]
    return figures


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory, shared_state) -> Path:
    """The default model requantized to Q8_0 by llama.cpp's own quantizer."""
    out = tmp_path_factory.mktemp("q8") / "gemma-3-270m-q8_0.gguf"
    proc = subprocess.run(
        [str(LLAMA_PYTHON), "-c", _QUANTIZE, str(DEFAULT_MODEL), str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.real_engine
@needs_llamacpp
@pytest.mark.parametrize("n_ctx", [2048, 8192])
@pytest.mark.parametrize("variant", ["Q4_K_M", "Q8_0"])
def test_estimate_matches_what_llama_cpp_allocates(request, variant, n_ctx):
    model = DEFAULT_MODEL if variant == "Q4_K_M" else request.getfixturevalue("q8_model")
    model_facts = read_model_facts(model)
    assert model_facts.file_type == variant
    est = estimate_llamacpp(model_facts, 0, n_ctx)
    assert est.weights_gpu == est.kv_gpu == est.compute_gpu == 0
    got = reported(model, n_ctx)
    want = {"weights": est.weights_cpu / MIB, "kv": est.kv_cpu / MIB, "compute": est.compute_cpu / MIB}
    for kind, mib in got.items():
        assert abs(want[kind] - mib) <= 0.05 * mib, f"{kind}: estimated {want[kind]:.1f} MiB, llama.cpp {mib:.1f} MiB"
