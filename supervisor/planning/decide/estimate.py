"""How much GPU memory and RAM an engine will take for a model, before it is started.

Pure arithmetic on a model's facts (``supervisor.planning.measure.model_facts`` reads them):
deciding whether a model fits the shared GPU must not cost a load.  The
llama.cpp figures follow what llama.cpp itself allocates (as vendored by
llama-cpp-python 0.3.36) and are checked against its own "model buffer",
"KV buffer" and "compute buffer" log lines by tests/test_estimate.py; the
formulas and the measured figures are in docs/ENGINES.md ("Memory model").
Not counted: the CUDA context (~520 MiB on an H100) and the allocator's
pools that grow during generation; callers add their own margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MIB = 1024 * 1024

CACHE_TYPES = ("f16", "q8_0", "q4_0")
# Bytes per cached element: f16, and ggml's 32-element blocks (q8_0: 32 bytes + an f16 scale).
_LLAMA_CACHE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# ExLlamaV2 caches: fp16, or 8/6/4-bit values plus an fp16 scale per 32 values.
EXL2_CACHE_TYPES = ("fp16", "q8", "q6", "q4")
_EXL2_CACHE_BYTES = {"fp16": 2.0, "q8": 1 + 2 / 32, "q6": 0.75 + 2 / 32, "q4": 0.5 + 2 / 32}

_PAD = 256  # llama.cpp pads n_ctx, and the SWA cache, to 256 cells
_F32 = 4
# Compute-buffer constants, fitted to llama.cpp's own reports (docs/ENGINES.md,
# "Memory model"): f32 activations of n_embd per token alive beside the
# attention scores (CPU: exact for a Llama shape at n_ctx 2048-8192; CUDA: exact
# for the H100 figures), and beside the logits (rounded up: where the allocator
# puts the logits left 2 to 5.75 activations below them in the graphs measured;
# with flash attention, 2).
_ATTN_ACTS_CPU = 4.0
_ATTN_ACTS_GPU = 3.0
_OUT_ACTS = 6.0
_OUT_ACTS_FA = 3.0


class FactsLike(Protocol):
    """The fields of planning.measure.model_facts.ModelFacts the estimate reads (core imports no I/O layer)."""

    @property
    def n_layer(self) -> int: ...
    @property
    def n_embd(self) -> int: ...
    @property
    def n_head(self) -> int: ...
    @property
    def n_head_kv(self) -> int: ...
    @property
    def head_dim_k(self) -> int: ...
    @property
    def head_dim_v(self) -> int: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def sliding_window(self) -> int | None: ...
    @property
    def swa_layers(self) -> int: ...
    @property
    def layer_bytes(self) -> tuple[int, ...]: ...
    @property
    def token_embd_bytes(self) -> int: ...
    @property
    def output_bytes(self) -> int: ...
    @property
    def other_bytes(self) -> int: ...
    @property
    def layer_repack_bytes(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by kind and by side; the GPU side is what has to fit next to other services."""

    weights_gpu: int
    weights_cpu: int
    kv_gpu: int
    kv_cpu: int
    compute_gpu: int
    compute_cpu: int

    @property
    def gpu_bytes(self) -> int:
        return self.weights_gpu + self.kv_gpu + self.compute_gpu

    @property
    def ram_bytes(self) -> int:
        return self.weights_cpu + self.kv_cpu + self.compute_cpu


@dataclass(frozen=True)
class _Placement:
    """Which blocks llama.cpp puts on the GPU: the last ``gpu_blocks`` ones, and the output layer."""

    n_layer: int
    gpu_blocks: int
    output_on_gpu: bool

    @property
    def first_gpu_block(self) -> int:
        return self.n_layer - self.gpu_blocks


@dataclass(frozen=True)
class _Options:
    flash_attn: bool
    swa_full: bool


def place_layers(n_layer: int, n_gpu_layers: int) -> _Placement:
    """llama.cpp's rule (llama_model::load_tensors): the output layer counts as layer n_layer.

    ``n_gpu_layers`` k takes layers from the back: k = 1 is the output layer
    alone, k = n_layer leaves block 0 on the CPU, k >= n_layer + 1 (or -1)
    is everything.  The input embedding always stays on the CPU.
    """
    k = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
    return _Placement(n_layer, max(k - 1, 0), k >= 1)


def _pad(n: int, to: int = _PAD) -> int:
    return -(-n // to) * to


def _weights(facts: FactsLike, place: _Placement, cpu_repack: bool) -> tuple[int, int]:
    """(GPU, CPU) weight bytes.  A tied output (no output.weight) offloaded is a GPU copy
    of token_embd, while the CPU keeps token_embd for the input lookup.  Blocks on the
    CPU whose types ggml repacks (x86 AVX2) also hold the repacked copy."""
    layers = facts.layer_bytes
    gpu = sum(layers[place.first_gpu_block :])
    cpu = sum(layers[: place.first_gpu_block]) + facts.token_embd_bytes
    if cpu_repack:
        cpu += sum(facts.layer_repack_bytes[: place.first_gpu_block])
    output = facts.output_bytes or facts.token_embd_bytes
    if place.output_on_gpu:
        gpu += output + facts.other_bytes
    else:
        cpu += facts.output_bytes + facts.other_bytes
    return gpu, cpu


def _swa_split(facts: FactsLike, gpu_blocks: int) -> tuple[int, int]:
    """(SWA blocks, global blocks) among the last ``gpu_blocks``, when only the count is known.

    Global layers are counted up (a period's global layer comes last in
    llama.cpp's default patterns, so the back of the model holds one first):
    the GPU share is never underestimated.
    """
    n_global = facts.n_layer - _n_swa(facts)
    gpu_global = min(gpu_blocks, -(-n_global * gpu_blocks // max(facts.n_layer, 1)))
    return gpu_blocks - gpu_global, gpu_global


def _n_swa(facts: FactsLike) -> int:
    """Sliding-window blocks that llama.cpp gives a window-sized cache."""
    return min(facts.swa_layers, facts.n_layer) if facts.sliding_window else 0


def _cache_cells(facts: FactsLike, n_ctx: int, n_ubatch: int, swa_full: bool) -> tuple[int, int]:
    """(cells of a global layer, cells of an SWA layer).  With swa_full (llama.cpp's
    default, which llama-cpp-python keeps) every layer has n_ctx cells; without,
    llama_kv_cache_iswa keeps pad(min(n_ctx, n_swa + n_ubatch), 256) for an SWA layer."""
    if swa_full or not _n_swa(facts) or not facts.sliding_window:
        return n_ctx, n_ctx
    return n_ctx, _pad(min(n_ctx, facts.sliding_window + n_ubatch))


def _kv(
    facts: FactsLike, place: _Placement, n_ctx: int, n_ubatch: int, cache_type: str, swa_full: bool
) -> tuple[int, int]:
    """(GPU, CPU) KV-cache bytes: each layer's cache lives where the layer does."""
    per_cell = _LLAMA_CACHE_BYTES[cache_type] * facts.n_head_kv * (facts.head_dim_k + facts.head_dim_v)
    full_cells, swa_cells = _cache_cells(facts, n_ctx, n_ubatch, swa_full)
    swa_gpu, global_gpu = _swa_split(facts, place.gpu_blocks)
    n_swa = _n_swa(facts)
    gpu = (swa_gpu * swa_cells + global_gpu * full_cells) * per_cell
    total = (n_swa * swa_cells + (facts.n_layer - n_swa) * full_cells) * per_cell
    return int(gpu), int(total - gpu)


def _attention_bytes(facts: FactsLike, n_ctx: int, n_ubatch: int, opts: _Options, acts: float) -> int:
    """Peak of one attention step: the masks (f32, one per cache kind, inputs alive
    all along), the scores n_kv x n_ubatch x n_head in f32 (not materialized with
    flash attention), Q/K/V, and a few n_embd activations."""
    flash_attn = opts.flash_attn
    full_cells, swa_cells = _cache_cells(facts, n_ctx, n_ubatch, opts.swa_full)
    has_swa = _n_swa(facts) > 0
    has_global = facts.n_layer > _n_swa(facts)
    mask_cells = (full_cells if has_global else 0) + (swa_cells if has_swa else 0)
    masks = _F32 * n_ubatch * mask_cells * (1.5 if flash_attn else 1)  # FA adds an f16 copy
    widest = full_cells if has_global else swa_cells
    scores = 0 if flash_attn else _F32 * n_ubatch * facts.n_head * widest
    qkv = _F32 * n_ubatch * (facts.n_head * facts.head_dim_k + facts.n_head_kv * (facts.head_dim_k + facts.head_dim_v))
    return int(masks + scores + qkv + acts * _F32 * n_ubatch * facts.n_embd)


def _output_bytes(facts: FactsLike, n_ubatch: int, flash_attn: bool) -> int:
    """Peak at the end of the graph: the logits (n_vocab x n_ubatch, f32: the
    reserve graph asks for an output per token) and a few n_embd activations."""
    acts = _OUT_ACTS_FA if flash_attn else _OUT_ACTS
    return _F32 * n_ubatch * (facts.n_vocab + int(acts * facts.n_embd))


def _compute(facts: FactsLike, place: _Placement, n_ctx: int, n_ubatch: int, opts: _Options) -> tuple[int, int]:
    """(GPU, CPU) compute buffers: each device holds the peak of the graph parts it runs.

    With everything on the GPU, the CPU side keeps the input embeddings
    (llama.cpp's CUDA_Host buffer): one n_embd activation per token.  With
    part of the blocks on the CPU, llama.cpp runs their matrix products on
    the GPU for prompt batches (op offload), staging the weights of a CPU
    block in the GPU's compute buffer: the largest such block is added.
    """
    out = _output_bytes(facts, n_ubatch, opts.flash_attn)
    gpu = cpu = 0
    if place.gpu_blocks:
        gpu = _attention_bytes(facts, n_ctx, n_ubatch, opts, _ATTN_ACTS_GPU)
    if place.first_gpu_block:
        cpu = _attention_bytes(facts, n_ctx, n_ubatch, opts, _ATTN_ACTS_CPU)
    if place.output_on_gpu:
        gpu = max(gpu, out) + max(facts.layer_bytes[: place.first_gpu_block], default=0)
    else:
        cpu = max(cpu, out)
    if not place.first_gpu_block:
        cpu = max(cpu, _F32 * n_ubatch * facts.n_embd)
    return gpu, cpu


def estimate_llamacpp(
    facts: FactsLike,
    n_gpu_layers: int,
    n_ctx: int,
    cache_type: str = "f16",
    n_batch: int = 512,
    n_ubatch: int = 512,
    *,
    flash_attn: bool = False,
    swa_full: bool = True,
    cpu_repack: bool = True,
) -> MemoryEstimate:
    """What llama.cpp allocates for this model with these context parameters.

    The defaults are what the worker runs (llama-cpp-python's Llama defaults):
    flash attention off, full-size SWA cache, CPU repacking on (x86 AVX2).
    ``n_ctx`` is padded to 256 as llama.cpp does; the micro-batch is
    min(n_ubatch, n_batch, n_ctx).  A quantized cache type needs flash
    attention in llama.cpp (it refuses a quantized V cache otherwise), so the
    compute buffer is estimated with flash attention for those.  The output
    buffer (n_vocab floats for one token) is part of ``compute_cpu``.
    """
    if cache_type not in _LLAMA_CACHE_BYTES:
        raise ValueError(f"cache_type {cache_type!r}: expected one of {', '.join(CACHE_TYPES)}")
    if n_ctx <= 0 or n_batch <= 0 or n_ubatch <= 0:
        raise ValueError("n_ctx, n_batch and n_ubatch must be positive")
    ctx = _pad(n_ctx)
    ubatch = min(n_ubatch, n_batch, n_ctx)  # llama-cpp-python caps n_batch at the unpadded n_ctx
    place = place_layers(facts.n_layer, n_gpu_layers)
    opts = _Options(flash_attn=flash_attn or cache_type != "f16", swa_full=swa_full)
    weights = _weights(facts, place, cpu_repack)
    kv = _kv(facts, place, ctx, ubatch, cache_type, swa_full)
    compute_gpu, compute_cpu = _compute(facts, place, ctx, ubatch, opts)
    return MemoryEstimate(*weights, *kv, compute_gpu, compute_cpu + _F32 * facts.n_vocab)


def estimate_exl2(facts: FactsLike, n_ctx: int, cache_type: str = "fp16") -> MemoryEstimate:
    """ExLlamaV2: every layer and the head on the GPU, the embedding table in RAM.

    The cache holds n_ctx (rounded up to 256, as the worker does) tokens of
    K and V for every layer; ExLlamaV2 caches sliding-window layers in full.
    The compute side is the attention scratch ExLlamaV2 reserves without
    flash-attn (exllamav2's temp_attn_size and temp_kv_size, default
    max_attention_size 2048^2); uncalibrated, no ExLlamaV2 figures yet.
    """
    if cache_type not in _EXL2_CACHE_BYTES:
        raise ValueError(f"cache_type {cache_type!r}: expected one of {', '.join(EXL2_CACHE_TYPES)}")
    if n_ctx <= 0:
        raise ValueError("n_ctx must be positive")
    ctx = _pad(n_ctx)
    per_token = facts.n_layer * facts.n_head_kv * (facts.head_dim_k + facts.head_dim_v)
    attn = 4 * min(ctx * ctx, 2048 * 2048) * facts.n_head
    expanded_kv = 4 * ctx * facts.n_head * facts.head_dim_k if facts.n_head_kv != facts.n_head else 0
    return MemoryEstimate(
        weights_gpu=sum(facts.layer_bytes) + facts.output_bytes + facts.other_bytes,
        weights_cpu=facts.token_embd_bytes,
        kv_gpu=int(ctx * per_token * _EXL2_CACHE_BYTES[cache_type]),
        kv_cpu=0,
        compute_gpu=attn + expanded_kv,
        compute_cpu=0,
    )
