"""The generation loop on llama.cpp's C API: prompt, sampler chain, token by token.

A helper of workers/llamacpp/engine.py, which hands it the ``llama_cpp`` module (that
engine module stays the only importer of its library) and the model and
context of a loaded ``Llama``.  ``Llama.generate`` is not used: per token it
runs Python bookkeeping and NumPy writes, and its stop checks and
detokenizing sit on top of that.  Here a token costs one
``llama_sampler_sample`` (a native chain that samples and accepts: the logits,
262 144 floats for Gemma, are never copied out), one end-of-generation check
on the vocabulary, one ``llama_token_to_piece`` into a buffer kept for the
load, and one ``llama_decode`` of a one-token batch built once.

The context keeps the previous request's keys and values; a prompt that
starts the same way (a chat's history, a fixed system prompt) is only
evaluated from where it differs, as ``Llama.generate`` did.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

from ..engine import RequestError
from ..protocol import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, ErrorCode
from ..protocol.messages import Sampling
from ..textstream import TextAssembler
from .constrained import GrammarSampler

# The defaults (Sampling's) are llama-cpp-python's, which served requests before
# this loop (min_p 0.05; typical_p 1 and repeat penalty 1 do nothing): a request
# with a seed samples the same text as it did then.
PIECE_BUFFER_BYTES = 256  # longer pieces (rare) get a buffer of their own


class TokenLoop:
    """One llama.cpp context, driven token by token; one request at a time."""

    def __init__(self, llama_cpp: Any, model: Any, ctx: Any, n_batch: int) -> None:
        self._c = c = llama_cpp
        self._ctx = ctx
        self._vocab = c.llama_model_get_vocab(model)
        self._n_vocab = c.llama_vocab_n_tokens(self._vocab)
        self._n_ctx = c.llama_n_ctx_seq(ctx)
        self._memory = c.llama_get_memory(ctx)
        self._n_batch = max(1, n_batch)
        self._n_swa = c.llama_model_n_swa(model)
        self._held: list[int] = []  # the tokens whose keys and values the context holds, in order
        self._eog: list[int] | None = None  # end-of-generation tokens, found on the first ignore_eos request
        self._piece = ctypes.create_string_buffer(PIECE_BUFFER_BYTES)
        # One token, decoded at the position after the last one held (llama_decode counts them).
        self._one = (c.llama_token * 1)()
        self._one_batch = c.llama_batch_get_one(self._one, 1)

    # --- a request -------------------------------------------------------------

    def sampler(self, params: Sampling, seed: int, prompt: list[int], grammar: str | None = None) -> Any:
        """A native sampler chain for one request; ``free`` it after.

        Links only for what the request asks (the defaults add none beyond
        the chain requests always had, so a seed samples the same text):
        a logit bias (``logit_bias``, and minus infinity on every
        end-of-generation token for ``ignore_eos``), the penalties (which
        first read the prompt's last ``penalty_last_n`` tokens, as
        llama-server's do), then greedy for temperature 0, else top-k, top-p,
        min-p, temperature and the seeded draw.  A ``grammar`` (GBNF: the
        engine's from the request's response_format or grammar; never the
        prompt's tokens) checks the chain's pick (constrained.py).  Token ids are
        checked against the vocabulary here, and a grammar that does not parse
        refused: ``RequestError`` names the field.
        """
        c = self._c
        biases = self._biases(params)  # first: it may refuse the request
        constraint = None
        if grammar is not None:
            if params.ignore_eos:
                raise RequestError(ErrorCode.INVALID_REQUEST, "ignore_eos: cannot be combined with a grammar")
            constraint = c.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
            if not constraint:  # llama.cpp's parser refused it (its reason is in the worker's log)
                field = "grammar" if params.grammar is not None else "response_format"
                raise RequestError(ErrorCode.INVALID_REQUEST, f"{field}: the grammar does not parse (llama.cpp's GBNF)")
        chain_params = c.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = c.llama_sampler_chain_init(chain_params)
        links = []
        if biases:
            array = (c.llama_logit_bias * len(biases))(*(c.llama_logit_bias(t, b) for t, b in biases.items()))
            links.append(c.llama_sampler_init_logit_bias(self._n_vocab, len(biases), array))  # copies the array
        if params.repeat_penalty != 1 or params.presence_penalty != 0 or params.frequency_penalty != 0:
            last_n = self._n_ctx if params.penalty_last_n < 0 else params.penalty_last_n
            penalties = c.llama_sampler_init_penalties(
                self._n_vocab, last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
            )
            for token in prompt[-last_n:] if last_n else ():
                c.llama_sampler_accept(penalties, token)
            links.append(penalties)
        if params.temperature == 0:
            links.append(c.llama_sampler_init_greedy())
        else:
            links += [
                c.llama_sampler_init_top_k(params.top_k),
                c.llama_sampler_init_top_p(params.top_p, 1),
                *([c.llama_sampler_init_min_p(params.min_p, 1)] if params.min_p > 0 else []),
                c.llama_sampler_init_temp(params.temperature),
                c.llama_sampler_init_dist(seed),
            ]
        for link in links:
            c.llama_sampler_chain_add(chain, link)  # the chain owns it from here
        # The grammar is asked about the chain's pick, not run over every candidate first (constrained.py).
        return chain if constraint is None else GrammarSampler(c, self._n_vocab, chain, constraint)

    def _biases(self, params: Sampling) -> dict[int, float]:
        biases: dict[int, float] = {}
        for key, bias in params.logit_bias.items():
            token = int(key)
            if token >= self._n_vocab:
                raise RequestError(
                    ErrorCode.INVALID_REQUEST,
                    f"logit_bias[{token}]: not a token of this model (it has {self._n_vocab})",
                )
            biases[token] = bias
        if params.ignore_eos:
            biases.update(dict.fromkeys(self._eog_tokens(), float("-inf")))
        return biases

    def free(self, sampler: Any) -> None:
        if isinstance(sampler, GrammarSampler):
            sampler.free()
        else:
            self._c.llama_sampler_free(sampler)

    def sample_function(self, sampler: Any) -> Callable[[Any, Any, int], int]:
        """What draws a token for ``sampler``: ``(sampler, ctx, index) -> token``."""
        return GrammarSampler.sample if isinstance(sampler, GrammarSampler) else self._c.llama_sampler_sample

    def prefill(self, tokens: list[int]) -> None:
        """Evaluate the prompt from where it differs from what the context holds."""
        keep = self._reusable_prefix(tokens)
        del self._held[keep:]
        for start in range(keep, len(tokens), self._n_batch):
            chunk = tokens[start : start + self._n_batch]
            array = (self._c.llama_token * len(chunk))(*chunk)
            self._decode(self._c.llama_batch_get_one(array, len(chunk)))
            self._held += chunk

    def run(
        self,
        sampler: Any,
        budget: int,
        stop_at_eog: bool,
        should_stop: Callable[[], bool],
        text: TextAssembler,
        emit: Any,
        sample: Callable[[Any, Any, int], int] | None = None,
    ) -> tuple[int, str]:
        """Sample, check, emit, decode, token by token: (tokens generated, finish reason).

        ``sample``: what draws a token instead of ``llama_sampler_sample`` (the
        logprobs recorder's, which reads the logits after it; logprobs.py).  A token ends the request before it is counted when ``should_stop()``
        says so (cancelled) or it is an end-of-generation token; after it is
        counted, when its text completes a stop string or it is the
        ``budget``-th.  The last token is never decoded: nothing reads its logits.
        """
        c = self._c
        sample, decode, to_piece, is_eog = (
            sample or self.sample_function(sampler),
            c.llama_decode,
            c.llama_token_to_piece,
            c.llama_vocab_is_eog,
        )
        ctx, vocab, buffer, size, one, batch, held = (
            self._ctx,
            self._vocab,
            self._piece,
            len(self._piece),
            self._one,
            self._one_batch,
            self._held,
        )
        feed, take_tokens = text.feed, text.take_tokens
        generated = 0
        while True:
            token = sample(sampler, ctx, -1)
            if should_stop():
                return generated, FINISH_CANCELLED
            if stop_at_eog and is_eog(vocab, token):
                return generated, FINISH_STOP
            generated += 1
            length = to_piece(vocab, token, buffer, size, 0, False)
            piece = feed(buffer[:length] if length >= 0 else self._long_piece(token, -length))
            if piece:  # may hold several tokens: text held back for a stop string or a split character
                emit(piece, take_tokens())
            if text.stopped:
                return generated, FINISH_STOP
            if generated >= budget:
                return generated, FINISH_LENGTH
            one[0] = token
            if (code := decode(ctx, batch)) != 0:
                self._decode_failed(code)
            held.append(token)

    # --- the context's memory --------------------------------------------------

    def _reusable_prefix(self, tokens: list[int]) -> int:
        """How many leading prompt tokens keep their cache entries; later entries are dropped."""
        common = 0
        for held, wanted in zip(self._held, tokens):
            if held != wanted:
                break
            common += 1
        keep = min(common, len(tokens) - 1)  # the last prompt token is decoded again: sampling reads its logits
        c, memory = self._c, self._memory
        if keep > 0 and c.llama_memory_seq_rm(memory, -1, keep, -1) and self._window_intact(keep):
            return keep
        if not c.llama_memory_seq_rm(memory, -1, 0, -1):  # a recurrent model's state cannot be cut: start over
            c.llama_memory_clear(memory, True)
        return 0

    def _window_intact(self, keep: int) -> bool:
        """A sliding-window cache that is not full-size drops entries the window
        has passed; a token at ``keep`` must still see the window before it
        (llama-server's check; llama.cpp's default full-size cache always can)."""
        pos_min = self._c.llama_memory_seq_pos_min(self._memory, 0)
        return pos_min <= max(0, keep - max(1, self._n_swa))

    def _decode(self, batch: Any) -> None:
        if (code := self._c.llama_decode(self._ctx, batch)) != 0:
            self._decode_failed(code)

    def _decode_failed(self, code: int) -> None:
        """What the cache holds after a failed decode is not known: nothing is reused."""
        self._c.llama_memory_clear(self._memory, True)
        self._held.clear()
        raise RuntimeError(f"llama_decode returned {code}")

    def piece(self, token: int) -> bytes:
        """A token's text bytes, into the buffer kept for the load (``run`` does the same inline)."""
        length = self._c.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece[:length] if length >= 0 else self._long_piece(token, -length)

    def _long_piece(self, token: int, length: int) -> bytes:
        buffer = ctypes.create_string_buffer(length)
        return buffer[: self._c.llama_token_to_piece(self._vocab, token, buffer, length, 0, False)]

    def _eog_tokens(self) -> list[int]:
        if self._eog is None:
            is_eog, vocab = self._c.llama_vocab_is_eog, self._vocab
            self._eog = [token for token in range(self._n_vocab) if is_eog(vocab, token)]
        return self._eog
