"""Serving several requests at once on a BatchEngine, step by step.

The main thread alternates: take in what the daemon sent (new requests,
cancels, a shutdown), start waiting requests while slots are free, end the
cancelled and the overdue, then one decode step for all running requests.
Between two steps nothing blocks, so a request arriving mid-generation joins
at the next step instead of waiting for the others to finish.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any

from . import protocol as p
from .conversation import Conversation
from .engine import BatchEngine, GenerateResult, RequestError
from .embedding import serve_embed
from .protocol.messages import Embed, Generate
from .tool_emitter import with_tool_calls


@dataclass
class _Running:
    emit: Any  # the request's emitter (Conversation.emitter), which records its first token's time
    started: float
    deadline: float | None


class BatchLoop:
    def __init__(self, conversation: Conversation, engine: BatchEngine) -> None:
        self.conversation = conversation
        self.engine = engine
        self.running: dict[str, _Running] = {}
        self._step_frames: list[bytes] = []  # the tokens of one step: they leave together

    def run(self) -> None:
        conversation = self.conversation
        while True:
            if not self.running:
                message = conversation.next_command()  # nothing to generate: wait for the daemon
                if message is None:
                    break
                conversation.put_back(message)
            else:
                conversation.read_commands()
            if conversation.stopping:
                break
            self._admit()
            self._end_stopped()
            if self.running:
                self._step()
        for request_id in list(self.running):  # shutting down: what runs ends as cancelled
            self._finish(request_id, self.engine.end(request_id))

    def _admit(self) -> None:
        waiting = self.conversation.waiting
        while waiting and len(self.running) < self.engine.slots:
            request = waiting.popleft()
            if isinstance(request, Embed):  # served whole now: its inputs are batched within it
                serve_embed(self.conversation, self.engine, request)
                continue
            if not isinstance(request, Generate):
                continue  # a second load: nothing to do with it
            started = time.monotonic()
            emit = self.conversation.emitter(request.request_id, self._step_frames.append, request.params.logprobs)
            emit = with_tool_calls(emit, request, self.conversation.activity)
            try:
                self.engine.begin(request, emit)
            except RequestError as exc:
                self.conversation.send_error(request.request_id, exc.code, exc.message)
                continue
            deadline = started + request.deadline_ms / 1000 if request.deadline_ms else None
            self.running[request.request_id] = _Running(emit, started, deadline)
        self._activity()

    def _end_stopped(self) -> None:
        now, cancelled = time.monotonic(), self.conversation.cancelled
        for request_id, running in list(self.running.items()):
            if request_id in cancelled or (running.deadline is not None and now >= running.deadline):
                self._finish(request_id, self.engine.end(request_id))

    def _step(self) -> None:
        try:
            ended = self.engine.step()
        except Exception as exc:  # the batch is lost: every request in it gets the error
            self._flush()
            traceback.print_exc()
            for request_id in list(self.running):
                self.running.pop(request_id)
                self.conversation.send_error(request_id, p.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            self._activity()
            return
        self._flush()
        for request_id, result in ended:
            self._finish(request_id, result)

    def _flush(self) -> None:
        """A step's token frames as one message: one send, one wake-up of the daemon, whatever the batch size."""
        if self._step_frames:
            self.conversation.send_frames(self._step_frames)
            self._step_frames.clear()

    def _finish(self, request_id: str, result: GenerateResult) -> None:
        running = self.running.pop(request_id, None)
        if running is not None:
            self.conversation.send_done(request_id, result, running.started, running.emit)
        self.conversation.forget(request_id)
        self._activity()

    def _activity(self) -> None:
        first = next(iter(self.running), None)
        self.conversation.activity.update(phase="generating" if first else "idle", request_id=first)
