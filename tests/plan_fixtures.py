"""Shared by the planner's tests: realistic model shapes, GPU snapshots and a
simple memory estimate, so the tests do not depend on the real estimator's
calibration (planning/decide/estimate.py has its own tests against llama.cpp's figures).

The GPU, model-facts and estimate types are the real ones.
"""

from __future__ import annotations

from dataclasses import replace

MIB = 1 << 20
GIB = 1 << 30

from supervisor.planning.decide.estimate import MemoryEstimate as Estimate
from supervisor.planning.measure.gpu import GpuDevice, GpuProcess, GpuSnapshot
from supervisor.planning.measure.model_facts import ModelFacts


def device(
    index: int,
    total_mib: int,
    neighbours_mib: int = 0,
    own: dict[int, int] | None = None,
    name: str = "NVIDIA GeForce RTX",
) -> GpuDevice:
    """A device with ``neighbours_mib`` used by other services and ``own`` {pid: MiB} by our workers."""
    own = own or {}
    used = (neighbours_mib + sum(own.values())) * MIB
    processes = tuple(GpuProcess(pid=pid, used_bytes=mib * MIB) for pid, mib in own.items())
    processes += (GpuProcess(pid=999_999, used_bytes=neighbours_mib * MIB),) if neighbours_mib else ()
    return GpuDevice(
        index=index,
        name=name,
        uuid=f"GPU-{index}",
        total_bytes=total_mib * MIB,
        free_bytes=total_mib * MIB - used,
        used_bytes=used,
        processes=processes,
    )


def snapshot(*devices: GpuDevice, reason: str = "nvml") -> GpuSnapshot:
    return GpuSnapshot(
        devices=tuple(devices),
        driver_version="580.00" if devices else None,
        cuda_version="13.0" if devices else None,
        reason=reason,
    )


def gguf(
    path: str,
    file_mb: float,
    n_layer: int = 36,
    n_embd: int = 2048,
    n_head: int = 16,
    n_head_kv: int = 2,
    n_vocab: int = 151936,
) -> ModelFacts:
    """A GGUF's facts from its shape and size: the token embedding at ~6.6 bits per
    weight (Q6_K), the rest spread evenly over the layers; the output tied to it."""
    file_bytes = int(file_mb * 1e6)
    embd = n_vocab * n_embd * 66 // 80
    per_layer = (file_bytes - embd) // n_layer
    return ModelFacts(
        path=f"/srv/models/{path}",
        format="gguf",
        architecture="qwen2",
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=n_embd // n_head,
        head_dim_v=n_embd // n_head,
        n_ctx_train=32768,
        n_vocab=n_vocab,
        sliding_window=None,
        swa_layers=0,
        file_type=path.rsplit("-", 1)[-1].removesuffix(".gguf"),
        file_bytes=file_bytes,
        layer_bytes=(per_layer,) * n_layer,
        token_embd_bytes=embd,
        output_bytes=0,
        other_bytes=file_bytes - embd - per_layer * n_layer,
    )


def exl2(path: str, file_mb: float, bits: float) -> ModelFacts:
    return replace(gguf(path, file_mb), format="exl2", file_type=None, bits=bits, head_bits=6)


# Qwen2.5-3B-Instruct: 36 layers, hidden 2048, 16 heads, 2 KV heads, head dim 128, vocab 151936.
Q6_K = gguf("qwen2.5-3b-instruct-q6_k.gguf", 2540)
Q4_K_M = gguf("qwen2.5-3b-instruct-q4_k_m.gguf", 1930)
Q3_K_M = gguf("qwen2.5-3b-instruct-q3_k_m.gguf", 1590)
QWEN_3B = (Q6_K, Q4_K_M, Q3_K_M)
# Qwen2.5-7B-Instruct Q4_K_M: 28 layers, hidden 3584, 28 heads, 4 KV heads, vocab 152064.
QWEN_7B = gguf("qwen2.5-7b-instruct-q4_k_m.gguf", 4680, n_layer=28, n_embd=3584, n_head=28, n_head_kv=4, n_vocab=152064)

KV_BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "fp16": 2.0, "q8": 34 / 32, "q4": 18 / 32}


def kv_bytes(facts: ModelFacts, n_ctx: int, cache_type: str, layers: int) -> int:
    return (
        int(n_ctx * facts.n_head_kv * (facts.head_dim_k + facts.head_dim_v) * KV_BYTES_PER_VALUE[cache_type]) * layers
    )


def compute_bytes(facts: ModelFacts, n_ctx: int, n_ubatch: int) -> int:
    """Logits for a micro-batch plus the attention scores of one layer."""
    return n_ubatch * (facts.n_vocab + n_ctx * facts.n_head) * 4


def estimate_llamacpp(
    facts: ModelFacts, n_gpu_layers: int, n_ctx: int, cache_type: str = "f16", n_batch: int = 512, n_ubatch: int = 512
) -> Estimate:
    """Layers go to the GPU from the back; the output layer is layer n_layer + 1."""
    offload = facts.n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, facts.n_layer + 1)
    repeating = min(offload, facts.n_layer)
    weights_gpu = sum(facts.layer_bytes[facts.n_layer - repeating :]) + (
        facts.token_embd_bytes if offload > facts.n_layer else 0
    )
    compute = compute_bytes(facts, n_ctx, n_ubatch)
    return Estimate(
        weights_gpu=weights_gpu,
        weights_cpu=facts.file_bytes - weights_gpu,
        kv_gpu=kv_bytes(facts, n_ctx, cache_type, repeating),
        kv_cpu=kv_bytes(facts, n_ctx, cache_type, facts.n_layer - repeating),
        compute_gpu=compute if offload else 0,
        compute_cpu=0 if offload else compute,
    )


EXL2_CALLS: list[str] = []  # the cache names the planner passed, for the test that checks them


def estimate_exl2(facts: ModelFacts, n_ctx: int, cache_type: str = "fp16") -> Estimate:
    EXL2_CALLS.append(cache_type)
    kv = kv_bytes(facts, n_ctx, cache_type, facts.n_layer)
    return Estimate(facts.file_bytes, 0, kv, 0, compute_bytes(facts, n_ctx, 512), 0)
