"""Sampling under a grammar without applying the grammar to the whole vocabulary at every token.

A grammar sampler placed in the chain checks every candidate token's text
against the grammar's stacks before anything else runs: 262 144 candidates
per token for Gemma, which made a JSON-constrained token cost 4 to 7 times
a free one.  llama.cpp's own common sampler (common/sampling.cpp, what
llama-server runs) avoids it: it samples with the chain alone, asks the
grammar about that one token, and only when the grammar refuses it applies
the grammar to every candidate and samples again.  Greedy picks the same
token either way (the best token the grammar allows is the best token when
the grammar allows it); a seeded draw can differ from grammar-first, as it
does in llama-server.

A helper of workers/llamacpp/loop.py and batch.py, handed the ``llama_cpp``
module like they are; the candidates live in one NumPy array kept for the
request (the library ships NumPy).
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


class GrammarSampler:
    """A request's sampler chain and its grammar, sampled grammar-second; ``free`` frees both."""

    def __init__(self, llama_cpp: Any, n_vocab: int, chain: Any, grammar: Any) -> None:
        self._c, self.chain, self.grammar = llama_cpp, chain, grammar
        assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._candidates = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._all = self._array_over(self._candidates)
        self._single = np.zeros(1, dtype=_TOKEN_DATA)
        self._one = self._array_over(self._single)
        self.resampled = 0  # tokens the grammar refused and sampled again under it (for tests and benchmarks)

    def _array_over(self, candidates: np.ndarray) -> Any:
        data = candidates.ctypes.data_as(ctypes.POINTER(self._c.llama_token_data))
        return self._c.llama_token_data_array(data=data, size=len(candidates), selected=-1, sorted=False)

    @staticmethod
    def sample(sampler: GrammarSampler, ctx: Any, index: int) -> int:
        """The next token from the logits at ``index``, accepted by the chain and the grammar
        (``llama_sampler_sample``'s signature, so the loops call either the same way)."""
        c = sampler._c
        logits = np.ctypeslib.as_array(c.llama_get_logits_ith(ctx, index), shape=(len(sampler._ids),))
        token = sampler._pick(logits, grammar_first=False)
        sampler._single[0] = (token, 1.0, 0.0)
        sampler._one.size, sampler._one.selected, sampler._one.sorted = 1, -1, False
        c.llama_sampler_apply(sampler.grammar, ctypes.byref(sampler._one))
        if math.isinf(sampler._single["logit"][0]):  # the grammar refuses it: the grammar first, then the chain
            sampler.resampled += 1
            token = sampler._pick(logits, grammar_first=True)
        c.llama_sampler_accept(sampler.grammar, token)
        c.llama_sampler_accept(sampler.chain, token)
        return token

    def _pick(self, logits: np.ndarray, grammar_first: bool) -> int:
        candidates, array = self._candidates, self._all
        candidates["id"] = self._ids  # the chain sorts and cuts the candidates in place: every pick starts afresh
        candidates["logit"] = logits
        array.size, array.selected, array.sorted = len(candidates), -1, False
        if grammar_first:
            self._c.llama_sampler_apply(self.grammar, ctypes.byref(array))
        self._c.llama_sampler_apply(self.chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeError(f"the sampler chain selected no token (selected {array.selected} of {array.size})")
        return int(array.data[array.selected].id)

    def free(self) -> None:
        self._c.llama_sampler_free(self.chain)
        self._c.llama_sampler_free(self.grammar)
