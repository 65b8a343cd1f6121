"""The facts record and its error, shared by the GGUF and EXL2 readers."""

from __future__ import annotations

from dataclasses import dataclass


class ModelFactsError(Exception):
    """A model file or directory that cannot be read; the message names it and says why."""


@dataclass(frozen=True)
class ModelFacts:
    path: str
    format: str  # "gguf" or "exl2"
    architecture: str  # general.architecture, e.g. "gemma3", "llama"
    n_layer: int  # <arch>.block_count
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int  # <arch>.attention.key_length, else n_embd // n_head
    head_dim_v: int
    n_ctx_train: int
    n_vocab: int
    sliding_window: int | None  # <arch>.attention.sliding_window; None without SWA
    swa_layers: int  # how many of the n_layer blocks use sliding-window attention
    file_type: str | None  # e.g. "Q4_K_M" from general.file_type
    file_bytes: int
    layer_bytes: tuple[int, ...]  # weight bytes of each block blk.N.*
    token_embd_bytes: int
    output_bytes: int  # output.weight; 0 when the output shares token_embd (tied)
    other_bytes: int  # everything else (norms outside blocks, ...)
    bits: float | None = None  # EXL2 only: quantization_config bits
    head_bits: int | None = None
    parameters: int | None = None  # GGUF: the tensors' elements, all counted; None where unknown (EXL2)
    # GGUF: bytes of each block that llama.cpp's CPU backend keeps a second,
    # interleaved copy of on x86 with AVX2 (CPU_REPACK buffer); () when none.
    layer_repack_bytes: tuple[int, ...] = ()
