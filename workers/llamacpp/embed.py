"""Embeddings on llama.cpp's C API: many inputs per decode, one pooled vector per sequence.

A helper of workers/llamacpp/engine.py, which hands it the ``llama_cpp`` module
(that engine module stays the only importer of its library) and the model and
context of a ``Llama`` loaded in embedding mode (``embeddings`` on, a pooling
type, one unified KV cache for up to ``n_seq_max`` sequences).  Each input is
one sequence; inputs are packed into a decode while they fit ``n_batch``
tokens and ``n_seq_max`` sequences, then each sequence's pooled vector is read
with ``llama_get_embeddings_seq``.  The memory is cleared before each decode,
so an input's vector does not depend on what was decoded before it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..engine import EmbedProgressFn, RequestError
from ..protocol import ErrorCode

# llama.cpp's pooling types by the configuration's names; None: the model's own (GGUF <arch>.pooling_type).
POOLING_TYPES = {"mean": 1, "cls": 2, "last": 3}
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
EMBED_SEQUENCES = 32  # inputs decoded together at most (as far as n_batch holds their tokens)


def model_pooling(llama_cpp: Any, model: Any) -> int:
    """The model's own pooling type from its metadata; mean where it has none (a generative model)."""
    value = _meta(llama_cpp, model, "general.architecture")
    own = _meta(llama_cpp, model, f"{value}.pooling_type") if value else None
    pooling = int(own) if own is not None and own.strip().isdigit() else 0
    return pooling if pooling in (1, 2, 3) else POOLING_TYPES["mean"]


def _meta(llama_cpp: Any, model: Any, key: str) -> str | None:
    import ctypes

    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


class EmbedLoop:
    """One llama.cpp context in embedding mode; one embed request at a time."""

    def __init__(self, llama_cpp: Any, model: Any, ctx: Any, normalize: bool) -> None:
        self._c = c = llama_cpp
        self._ctx = ctx
        self._memory = c.llama_get_memory(ctx)
        self.n_embd = c.llama_model_n_embd(model)
        self._n_vocab = c.llama_vocab_n_tokens(c.llama_model_get_vocab(model))
        # A sequence must be decoded in one micro-batch to be pooled whole.
        self._n_batch = c.llama_n_batch(ctx)
        self._n_input = min(self._n_batch, c.llama_n_ubatch(ctx), c.llama_n_ctx(ctx))
        self._n_seq = max(1, c.llama_n_seq_max(ctx))
        self._normalize = normalize
        self._batch = c.llama_batch_init(self._n_batch, 0, self._n_seq)
        self.pooling = POOLING_NAMES.get(c.llama_pooling_type(ctx), "?")

    def check(self, inputs: Sequence[Sequence[int]]) -> None:
        """RequestError for an input that is too long for one decode or holds a token the model does not have."""
        for i, tokens in enumerate(inputs):
            if len(tokens) > self._n_input:
                raise RequestError(
                    ErrorCode.CONTEXT_OVERFLOW,
                    f"input[{i}]: {len(tokens)} tokens; one input holds at most {self._n_input} (n_ubatch, n_ctx)",
                )
            bad = next((t for t in tokens if t >= self._n_vocab), None)
            if bad is not None:
                raise RequestError(
                    ErrorCode.INVALID_REQUEST,
                    f"input[{i}]: {bad} is not a token of this model (it has {self._n_vocab})",
                )

    def embed(self, inputs: Sequence[Sequence[int]], progress: EmbedProgressFn) -> list[list[float]] | None:
        """One vector per input, in order; None when ``progress`` asked to stop between two decodes."""
        self.check(inputs)
        vectors: list[list[float]] = []
        group: list[Sequence[int]] = []
        used = 0
        for tokens in inputs:
            if group and (used + len(tokens) > self._n_batch or len(group) == self._n_seq):
                vectors += self._decode(group)
                if progress(used):
                    return None
                group, used = [], 0
            group.append(tokens)
            used += len(tokens)
        vectors += self._decode(group)
        progress(used)  # counted; nothing is left to stop
        return vectors

    def _decode(self, group: Sequence[Sequence[int]]) -> list[list[float]]:
        c, batch = self._c, self._batch
        c.llama_memory_clear(self._memory, True)
        k = 0
        for seq, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = token, pos, 1, True
                batch.seq_id[k][0] = seq
                k += 1
        batch.n_tokens = k
        status = c.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        out = []
        for seq in range(len(group)):
            pointer = c.llama_get_embeddings_seq(self._ctx, seq)
            if not pointer:
                raise RuntimeError(f"no pooled embedding for sequence {seq} (pooling {self.pooling})")
            vector = pointer[: self.n_embd]
            if self._normalize:
                norm = math.sqrt(math.fsum(x * x for x in vector))
                vector = [x / norm for x in vector] if norm > 0 else vector
            out.append(vector)
        return out

    def free(self) -> None:
        self._c.llama_batch_free(self._batch)
