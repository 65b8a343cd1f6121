"""Several requests decoded together in one llama.cpp context (``parallel``).

A helper of workers/llamacpp/engine.py, handed the ``llama_cpp`` module.  Each
running request owns one sequence of the context (as a slot of
``llama-server -np`` does); the context holds ``n_ctx`` cells for each, not
shared (``kv_unified`` off), so one long request cannot starve the others.
A step is one ``llama_decode`` of one batch holding, for every sequence, its
last sampled token, or the next chunk of its prompt (a new request joins the
running ones at the next step, its prompt read alongside their tokens); then
every sequence whose logits came back samples its next token with its own
native sampler chain at its index in the batch.  Per token, as in
loop.py (whose sampler chains and piece buffer it uses): no logits
copy, no NumPy, one piece into a buffer.

A sequence's cache is cleared when its request ends: prompts are not reused
across requests in this mode (the single-request loop reuses them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..engine import EmitFn, GenerateResult
from ..protocol import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP
from ..textstream import TextAssembler

if TYPE_CHECKING:
    from .loop import TokenLoop


@dataclass
class _Sequence:
    seq_id: int
    prompt: list[int]  # prompt tokens not yet decoded
    prompt_tokens: int
    sampler: Any
    text: TextAssembler
    emit: EmitFn
    budget: int  # tokens it may generate
    stop_at_eog: bool
    sample: Any  # llama_sampler_sample, the grammar's (constrained.py), or the logprobs recorder's (logprobs.py)
    position: int = 0  # the position of the next token fed to the context
    next_token: int | None = None  # sampled, not yet decoded
    logits_at: int = -1  # its row in the last batch's logits; -1: none asked
    generated: int = 0


class SequenceBatch:
    def __init__(self, llama_cpp: Any, model: Any, ctx: Any, slots: int, n_batch: int, loop: "TokenLoop") -> None:
        self._c = c = llama_cpp
        self._ctx = ctx
        self._vocab = c.llama_model_get_vocab(model)
        self._memory = c.llama_get_memory(ctx)
        self._loop = loop  # the same context's single-request loop: sampler chains and token pieces
        self.n_ctx_seq = c.llama_n_ctx_seq(ctx)
        # A step holds at most n_batch tokens, and always one per generating sequence.
        self._capacity = max(n_batch, slots)
        self._batch = c.llama_batch_init(self._capacity, 0, 1)
        self._free_ids = list(range(slots))
        self._running: dict[str, _Sequence] = {}

    def close(self) -> None:
        for request_id in list(self._running):
            self.end(request_id)
        self._c.llama_batch_free(self._batch)

    # --- requests ---------------------------------------------------------------------

    def begin(
        self,
        request_id: str,
        prompt: list[int],
        sampler: Any,
        text: TextAssembler,
        emit: EmitFn,
        max_tokens: int,
        stop_at_eog: bool,
        sample: Any = None,
    ) -> None:
        seq_id = min(self._free_ids)  # the lowest: running ids stay consecutive where they can (see _fill)
        self._free_ids.remove(seq_id)
        self._c.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        budget = min(max_tokens, self.n_ctx_seq - len(prompt))
        self._running[request_id] = _Sequence(
            seq_id,
            list(prompt),
            len(prompt),
            sampler,
            text,
            emit,
            budget,
            stop_at_eog,
            sample or self._loop.sample_function(sampler),
        )

    def end(self, request_id: str, finish: str = FINISH_CANCELLED) -> GenerateResult:
        """Take a request out (ended or stopped): its text held back is sent, its slot freed."""
        sequence = self._running.pop(request_id)
        tail = sequence.text.flush()
        if tail:  # as the single-request loop does, cancelled or not
            sequence.emit(tail, sequence.text.take_tokens())
        self._loop.free(sequence.sampler)
        self._c.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
        self._free_ids.append(sequence.seq_id)
        return GenerateResult(
            finish_reason=finish, prompt_tokens=sequence.prompt_tokens, completion_tokens=sequence.generated
        )

    # --- one step ----------------------------------------------------------------------

    def step(self) -> list[tuple[str, GenerateResult]]:
        """Decode one batch for every running request, then sample each one's next token."""
        if self._fill() == 0:
            return []
        if (code := self._c.llama_decode(self._ctx, self._batch)) != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        ended = []
        for request_id, sequence in list(self._running.items()):
            if sequence.logits_at >= 0:
                finish = self._sample(sequence)
                if finish is not None:
                    ended.append((request_id, self.end(request_id, finish)))
        return ended

    def _fill(self) -> int:
        """The batch: each generating sequence's token first (one each), then prompt chunks in the room left."""
        batch, count = self._batch, 0
        # In ascending sequence id: with a cache per sequence (kv_unified off) llama.cpp splits a batch into
        # micro-batches of consecutive ids, so any other order costs a decode per run of ids, not one per step.
        sequences = sorted(self._running.values(), key=lambda sequence: sequence.seq_id)
        for sequence in sequences:
            sequence.logits_at = -1
            if sequence.next_token is not None:
                self._add(count, sequence.next_token, sequence, logits=True)
                sequence.next_token = None
                count += 1
        for sequence in sequences:
            room = self._capacity - count
            if not sequence.prompt or room <= 0:
                continue
            chunk, sequence.prompt = sequence.prompt[:room], sequence.prompt[room:]
            for i, token in enumerate(chunk):
                self._add(count, token, sequence, logits=not sequence.prompt and i == len(chunk) - 1)
                count += 1
        batch.n_tokens = count
        return count

    def _add(self, index: int, token: int, sequence: _Sequence, logits: bool) -> None:
        batch = self._batch
        batch.token[index] = token
        batch.pos[index] = sequence.position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = sequence.seq_id
        batch.logits[index] = logits
        sequence.position += 1
        if logits:
            sequence.logits_at = index

    def _sample(self, sequence: _Sequence) -> str | None:
        """Its next token: sent, and fed to the next step; a finish reason when the request ends here."""
        c = self._c
        token = sequence.sample(sequence.sampler, self._ctx, sequence.logits_at)
        if sequence.stop_at_eog and c.llama_vocab_is_eog(self._vocab, token):
            return FINISH_STOP
        sequence.generated += 1
        piece = sequence.text.feed(self._loop.piece(token))
        if piece:
            sequence.emit(piece, sequence.text.take_tokens())
        if sequence.text.stopped:
            return FINISH_STOP
        if sequence.generated >= sequence.budget:
            return FINISH_LENGTH
        sequence.next_token = token
        return None
