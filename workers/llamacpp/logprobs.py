"""Log-probabilities of the tokens a request generates, read from llama.cpp's logits only when it asks.

A helper of workers/llamacpp/engine.py (handed the ``llama_cpp`` module), used
by the single-request loop (loop.py) and per sequence by the batch (batch.py):
a request that asks samples through :meth:`LogprobRecorder.sample` and emits
through :meth:`LogprobRecorder.emit_through`; one that does not never meets
this module (its loop samples with ``llama_sampler_sample`` itself and sends
the fast token form), so the default path costs exactly what it did.

Which distribution: the model's own, a softmax of the raw logits of the
position the token was sampled at, before the sampler chain's logit bias,
penalties, grammar, top-k/top-p/min-p and temperature: what llama-server
reports by default (``post_sampling_probs`` false), and what the OpenAI API's
``logprobs`` are.  The chain never writes the context's logits
(``llama_sampler_sample`` copies them into its candidates), so reading the
row after the draw reads what the model gave.  Per token: a NumPy view of the
row (no copy), its max, one sum of exponentials, and for ``top_logprobs`` an
``argpartition`` (no full sort of the vocabulary).

Entries line up with the text: each sampled token's entry waits in order, and
a piece of text carrying ``tokens`` tokens (TextAssembler.take_tokens) takes
that many entries with it; the tokens of a stop string, never counted, and an
end-of-generation token, never emitted, leave theirs behind.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np


class LogprobRecorder:
    """One request's logprobs: entries recorded as tokens are sampled, sent with the text that holds them."""

    def __init__(
        self, llama_cpp: Any, n_vocab: int, top: int, piece: Callable[[int], bytes], draw: Callable[..., int]
    ) -> None:
        self._draw = draw  # the request's own: llama_sampler_sample, or the grammar's (constrained.py)
        self._logits = llama_cpp.llama_get_logits_ith
        self._n_vocab = n_vocab
        self._top = min(top, n_vocab)
        self._piece = piece  # a token's text bytes
        self._pending: deque[dict[str, Any]] = deque()

    def sample(self, sampler: Any, ctx: Any, index: int) -> int:
        """``llama_sampler_sample``, then the drawn token's entry from the row the draw read."""
        token = self._draw(sampler, ctx, index)
        row = np.ctypeslib.as_array(self._logits(ctx, index), shape=(self._n_vocab,))
        peak = float(row.max())
        log_total = peak + float(np.log(np.exp(row - peak).sum(dtype=np.float64)))
        entry = self._entry(token, float(row[token]) - log_total)
        top: list[dict[str, Any]] = []
        if self._top:
            best = np.argpartition(row, -self._top)[-self._top :]
            best = best[np.argsort(-row[best], kind="stable")]
            top = [self._entry(int(t), float(row[t]) - log_total) for t in best]
        entry["top_logprobs"] = top
        self._pending.append(entry)
        return token

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self._piece(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    def emit_through(self, emit: Any) -> Any:
        """An emit function that sends each piece with the entries of the tokens it holds."""
        pending = self._pending

        def emit_with_entries(text: str, tokens: int = 1) -> None:
            emit(text, tokens, [pending.popleft() for _ in range(min(tokens, len(pending)))])

        return emit_with_entries
