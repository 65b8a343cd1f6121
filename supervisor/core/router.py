"""Requests: where they go, how they wait, and how each one ends.  Pure.

One enqueue path (:meth:`Router.enqueue`: new, retried, rerouted and moved
requests alike, one queue bound) and one terminal path (:meth:`Router.finish`:
every end, whatever its cause, goes through it: the client's reply, the
counters, the log line, the probe hook).  The router acts through Effects
only; the supervisor tells it about workers that died or engines that
changed.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Callable

from workers import protocol as p
from workers.protocol import ErrorCode
from workers.protocol.messages import Cancel, Done, Embed, Embeddings, Generate, GenerateError

from ..logs import get_logger
from .effects import Effects, TOPIC_REQUEST_RETRY
from .engines import Engines, EngineState
from .policy import LatencySwitch
from .request import ClientRequest, Generation, Probe
from .errors import Refused
from .validate import GenerateParams

log = get_logger("supervisor.router")

ProbeHook = Callable[[Probe, bool, str, float], None]  # probe, ok, detail, now


class Router:
    def __init__(self, engines: Engines, switch: LatencySwitch, effects: Effects, probe_interval_s: float) -> None:
        self.engines = engines
        self.probe_interval_s = probe_interval_s
        self.switch = switch
        self.effects = effects
        self.requests: dict[tuple[bytes, str], ClientRequest] = {}
        self.probes: set[Probe] = set()
        # Set by the composition root: the supervisor judges probes, the daily budgets react to a spent one.
        self.on_probe_end: ProbeHook = lambda *_: None
        self.on_budget_spent: Callable[[EngineState, float], None] = lambda *_: None
        self._wire_ids = itertools.count(1)
        engines.on_no_room = self.refuse_queue

    # --- arrivals ----------------------------------------------------------------

    def submit(self, envelope: list[bytes], mid: str, params: GenerateParams, now: float) -> None:
        """A validated generate op: queue it or refuse it (Refused, counted by engine and code)."""
        engine = self.engines.get(params.engine)  # a client's name for an engine is counted only if it names one
        try:
            if self.engines.stopping:
                raise Refused(ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
            request = ClientRequest(
                client=b"".join(envelope), id=mid, envelope=envelope, params=params, received_at=now
            )
            if request.key in self.requests:
                raise Refused(ErrorCode.DUPLICATE_ID, f"id {mid!r} is still in use by a running request")
            engine = self._choose_engine(params.engine, params.needs())
            if not engine.has_room:
                raise Refused(
                    ErrorCode.BUSY, f"engine {engine.name!r} has {len(engine.queue)} requests waiting (max_queue)"
                )
        except Refused as refused:
            self.engines.count_refusal(engine, refused.code)
            raise
        self.requests[request.key] = request
        # Ollama's keep_alive: this request's, else the engine's own, from now on.
        engine.residency.keep_alive_s = engine.config.keep_alive_s if params.keep_alive is None else params.keep_alive
        engine.residency.last_used_at = now
        self.enqueue(request, engine, "a request arrived", now)
        if request.deadline_at is not None:
            self.effects.wake_at(request.deadline_at)

    def in_use(self, envelope: list[bytes], mid: str) -> bool:
        """Whether ``mid`` names a running request of this client (ids of other ops must not)."""
        return (b"".join(envelope), mid) in self.requests

    def _choose_engine(self, pinned: str | None, needs: dict[str, str]) -> EngineState:
        """The engine for a new request: its pinned one, else the one taking traffic that can do what it
        ``needs`` (capability -> the field asking for it); ``unsupported_parameter`` when none that serves can."""
        if pinned is not None:
            engine = self.engines.get(pinned)
            if engine is None:
                raise Refused(
                    ErrorCode.UNKNOWN_ENGINE,
                    f"no engine named {pinned!r}; configured: {', '.join(self.engines.by_name)}",
                )
            if engine.refusal:
                raise Refused(*engine.refusal)
            if engine.lacks(needs):
                raise unsupported(engine.lacks(needs), [engine])
            return engine
        engine = self.target_for_unpinned(needs)
        if engine is None:
            serving = [e for e in self.engines.by_priority() if e.refusal is None]
            if serving:  # named by the first need an engine that serves lacks
                lacked = {c: n for c, n in needs.items() if any(e.lacks({c: n}) for e in serving)}
                raise unsupported(lacked or needs, serving)
            reasons = "; ".join(f"{e.name}: {e.refusal[1]}" for e in self.engines if e.refusal)
            raise Refused(ErrorCode.NO_ENGINE, f"no engine can serve: {reasons}")
        return engine

    def running(self) -> int:
        """Client requests being generated now."""
        return sum(
            isinstance(g, ClientRequest) and not g.finished for e in self.engines for g in e.worker.running.values()
        )

    def target_for_unpinned(self, needs: dict[str, str] | None = None) -> EngineState | None:
        """The engine the latency switch chose, else the first by priority that serves; of those that can
        do what a request ``needs``, as far as is known (an engine never ready yet may)."""
        needs = needs or {}
        active = self.engines.get(self.switch.active)
        if active is not None and active.refusal is None and not active.lacks(needs):
            return active
        return next((e for e in self.engines.by_priority() if e.refusal is None and not e.lacks(needs)), None)

    def add_probe(self, probe: Probe, engine: EngineState, now: float) -> None:
        self.probes.add(probe)
        self.enqueue(probe, engine, "liveness probe", now)
        self.effects.wake_at(probe.deadline_at or now)

    # --- the one enqueue path ----------------------------------------------------

    def enqueue(
        self, generation: Generation, engine: EngineState, reason: str, now: float, front: bool = False
    ) -> bool:
        """Queue on ``engine`` within its bound, make sure a worker is coming, dispatch if idle."""
        if not engine.has_room:
            return False
        generation.engine = engine.name
        (engine.queue.appendleft if front else engine.queue.append)(generation)
        self.engines.ensure_running(engine, reason, now)
        self.pump(engine, now)
        return True

    def refuse_queue(self, engine: EngineState, code: str, message: str, now: float) -> None:
        """No GPU can take the engine's model: what waits for it ends with ``code``."""
        while engine.queue:
            self.fail(engine.queue.popleft(), code, message, now)

    def pump(self, engine: EngineState, now: float) -> None:
        """Give the engine's idle worker the oldest waiting request (none while a reload drains it)."""
        if self.engines.is_draining(engine):
            self.engines.drain(engine, now)
            return
        while engine.worker.free_slots and engine.queue:
            generation = engine.queue.popleft()
            if generation.finished:
                continue
            lacking = engine.lacks(generation.params.needs())  # known now: its worker is ready
            if lacking:
                refused = unsupported(lacking, [engine])
                self.fail(generation, refused.code, refused.message, now)
            else:
                self._dispatch(engine, generation, now)

    def _dispatch(self, engine: EngineState, generation: Generation, now: float) -> None:
        worker = engine.worker
        generation.dispatched_at = now
        ready_at = worker.times.ready_at
        if ready_at is not None and ready_at > generation.received_at:  # it waited for this worker's load
            generation.load_ms = round((ready_at - max(generation.received_at, worker.times.started_at or 0)) * 1000, 3)
        generation.first_token_at = generation.last_token_at = None
        generation.worker_id = worker.worker_id
        generation.attempts += 1
        generation.wire_id = f"r{next(self._wire_ids)}"
        generation.worker_token_prefix = p.token_frame_prefix(generation.wire_id)
        worker.running[generation.wire_id] = generation
        deadline_at = generation.deadline_at
        deadline_ms = None if deadline_at is None else max(1, int((deadline_at - now) * 1000))
        params = generation.params
        message: Generate | Embed
        if params.input is not None:
            strings = isinstance(params.input[0], str)
            message = Embed(
                request_id=generation.wire_id,
                texts=params.input if strings else None,  # type: ignore[arg-type]
                token_arrays=None if strings else params.input,  # type: ignore[arg-type]
                deadline_ms=deadline_ms,
            )
        else:
            message = Generate(
                request_id=generation.wire_id,
                prompt=params.prompt,
                messages=None if params.messages is None else tuple(params.messages),
                params=params.sampling,
                deadline_ms=deadline_ms,
            )
        self.effects.send_worker(worker.worker_id, message)

    # --- requests leaving an engine ----------------------------------------------------

    def move_unpinned(self, source: EngineState, target: EngineState, now: float) -> None:
        """Traffic switched: waiting requests that named no engine follow it, as far as it has room."""
        for request in [r for r in source.queue if isinstance(r, ClientRequest) and r.params.engine is None]:
            if not target.has_room:
                return
            if target.lacks(request.params.needs()):
                continue
            source.remove(request)
            self.enqueue(request, target, "requests moved here", now)

    def reroute_queue(self, engine: EngineState, now: float) -> None:
        """An engine that cannot serve hands its waiting requests on, or refuses them."""
        refusal = engine.refusal or (ErrorCode.ENGINE_UNAVAILABLE, "engine cannot serve")
        while engine.queue:
            generation = engine.queue.popleft()
            target = self._target_for(engine, generation)
            if target is None or target is engine or not self.enqueue(generation, target, "requests moved here", now):
                self.fail(generation, refusal[0], refusal[1], now)

    def worker_lost(self, engine: EngineState, generation: Generation, cause: str, now: float) -> None:
        """The worker running ``generation`` died: retried once, elsewhere if possible, if nothing was streamed yet."""
        if generation.cancelled:
            self.done(
                generation, p.FINISH_CANCELLED, {"prompt_tokens": None, "completion_tokens": generation.tokens}, {}, now
            )
            return
        if (
            isinstance(generation, ClientRequest)
            and generation.tokens == 0
            and generation.attempts < 2
            and not self.engines.stopping
        ):
            target = self._target_for(engine, generation)
            generation.dispatched_at = None
            if target is not None and self.enqueue(generation, target, "a request is retried here", now, front=True):
                log.warning(
                    "retrying request after worker exit", request_id=generation.id, engine=target.name, cause=cause
                )
                self.effects.publish(
                    TOPIC_REQUEST_RETRY,
                    request_id=generation.id,
                    from_worker=generation.worker_id,
                    engine=target.name,
                    cause=cause,
                )
                return
        self.fail(
            generation,
            ErrorCode.ENGINE_FAILED,
            f"worker {generation.worker_id} {cause} after {generation.tokens} tokens",
            now,
            usage={"prompt_tokens": None, "completion_tokens": generation.tokens},
        )

    def _target_for(self, engine: EngineState, generation: Generation) -> EngineState | None:
        """Its pinned engine if that still serves; unpinned, the engine that takes traffic now."""
        if generation.params.engine is not None:
            return engine if engine.refusal is None else None
        return self.target_for_unpinned(generation.params.needs())

    # --- cancels, deadlines, vanished clients ---------------------------------------------

    def cancel(self, envelope: list[bytes], target: str, now: float) -> bool:
        """Stop a request: a queued one ends here, a running one when its worker confirms."""
        request = self.requests.get((b"".join(envelope), target))
        if request is None:
            return False
        request.cancelled = True
        if self._withdraw(request):
            self.done(request, p.FINISH_CANCELLED, {"prompt_tokens": 0, "completion_tokens": 0}, {}, now)
        return True

    def expire(self, now: float) -> None:
        """End every generation whose deadline has passed."""
        for generation in [*self.requests.values(), *self.probes]:
            deadline_at = generation.deadline_at
            if deadline_at is None or now < deadline_at or generation.finished:
                continue
            self._deadline_passed(generation, now)
            self._withdraw(generation)

    def client_gone(self, client: bytes, now: float) -> None:
        """Nobody will read the answers: the client's requests end as cancelled (not failures: nothing went
        wrong here), and no compute is spent on them any more."""
        gone = [r for r in self.requests.values() if r.client == client]
        if gone:
            log.info(
                "client went away; its requests are cancelled",
                request_ids=[r.id for r in gone],
                reason="it disconnected or fell too far behind",
            )
        for request in gone:
            request.cancelled = True
            usage = {"prompt_tokens": None, "completion_tokens": request.tokens}
            self.done(request, p.FINISH_CANCELLED, usage, {}, now, reply=False)
            self._withdraw(request)

    def _withdraw(self, generation: Generation) -> bool:
        """Take a generation out of its engine's queue (True), or tell the worker running it to stop."""
        engine = self.engines[generation.engine]
        if engine.remove(generation):
            return True
        if engine.worker.running.get(generation.wire_id) is generation:
            self.effects.send_worker(engine.worker.worker_id, Cancel(request_id=generation.wire_id))
        return False

    def _deadline_passed(self, generation: Generation, now: float) -> None:
        self.fail(generation, ErrorCode.DEADLINE, f"deadline of {generation.params.deadline_ms} ms passed", now)

    # --- what the worker sends back -------------------------------------------------

    def on_token(
        self,
        engine: EngineState,
        wire_id: str,
        text_literal: bytes,
        tokens: int,
        now: float,
        logprobs: tuple[dict[str, Any], ...] | None = None,
    ) -> None:
        """Tokens of a running request; ``text_literal`` is their text as a JSON string literal;
        ``logprobs``: their entries, when the request asked (they go with the text)."""
        generation = engine.worker.running.get(wire_id)
        engine.worker.times.last_heard = now
        if generation is None:
            return
        previous_at, generation.last_token_at = generation.last_token_at, now
        if generation.finished:
            return
        generation.tokens += tokens
        if generation.first_token_at is None:
            generation.first_token_at = now
        if not isinstance(generation, ClientRequest):
            return
        engine.stats.record_tokens(generation, previous_at, tokens, now)
        if generation.params.stream:
            if logprobs is None:
                event = b'%s%s,"index":%d}' % (generation.token_event_prefix, text_literal, generation.token_events)
            else:
                event = b'%s%s,"index":%d,"logprobs":%s}' % (
                    generation.token_event_prefix,
                    text_literal,
                    generation.token_events,
                    p.encode(list(logprobs)),  # type: ignore[arg-type]
                )
            generation.token_events += 1
            if not self.effects.send_client(generation.envelope, event):
                self.client_gone(generation.client, now)
        else:
            generation.text.append(json.loads(text_literal))
            if logprobs is not None:
                generation.logprobs.extend(logprobs)

    def on_result(self, engine: EngineState, message: Done | Embeddings | GenerateError, now: float) -> None:
        """The worker's done, embeddings or error for its running request."""
        generation = engine.worker.running.pop(message.request_id, None)
        if generation is None:
            return  # the end of a request already retried elsewhere
        engine.worker.times.probe_due_at = now + self.probe_interval_s
        deadline_at = generation.deadline_at
        if deadline_at is not None and now >= deadline_at:
            # The worker stops at the deadline too; its "cancelled" must not win over the daemon's verdict.
            self._deadline_passed(generation, now)
        if isinstance(message, Done):
            if not generation.finished and generation.first_token_at is not None:
                engine.latency.record(
                    now, generation.engine_ttft_ms(), (now - generation.first_token_at) * 1000, generation.tokens
                )
            self.done(
                generation, message.finish_reason, message.usage.to_wire(), message.timings, now, message.tool_calls
            )
        elif isinstance(message, Embeddings):
            self.finish(generation, generation.embeddings_event(message.vectors, message.usage.prompt_tokens, now), now)
        else:
            self.fail(generation, message.code, message.message, now)
        self.pump(engine, now)

    # --- the one terminal path ---------------------------------------------------------

    def done(
        self,
        generation: Generation,
        finish_reason: str,
        usage: dict[str, Any],
        worker_timings: dict[str, Any],
        now: float,
        tool_calls: tuple[dict[str, Any], ...] | None = None,
        reply: bool = True,
    ) -> None:
        event = generation.done_event(finish_reason, usage, worker_timings, now, tool_calls)
        self.finish(generation, event, now, reply=reply)

    def fail(
        self,
        generation: Generation,
        code: str,
        message: str,
        now: float,
        usage: dict[str, Any] | None = None,
        reply: bool = True,
    ) -> None:
        self.finish(generation, generation.error_event(code, message, now, usage), now, reply=reply)

    def finish(self, generation: Generation, event: dict[str, Any], now: float, reply: bool = True) -> None:
        """Every end of every generation: exactly once, whatever its cause."""
        if not generation.finish():
            return
        ok = event["event"] != p.EVENT_ERROR
        if isinstance(generation, Probe):
            self.probes.discard(generation)
            self.on_probe_end(generation, ok, event.get("message", ""), now)
            return
        assert isinstance(generation, ClientRequest)
        engine = self.engines.get(generation.engine)
        budget_spent = engine is not None and engine.record_end(generation, event, now)
        self.requests.pop(generation.key, None)
        event = {"id": generation.id, **event, "engine": generation.engine or None, "worker": generation.worker_id}
        if reply and not self.effects.send_client(generation.envelope, p.encode(event)):
            self.client_gone(generation.client, now)
        log.info(
            "request end",
            request_id=generation.id,
            engine=generation.engine,
            worker_id=generation.worker_id,
            outcome=event["event"],
            code=event.get("code"),
            finish_reason=event.get("finish_reason"),
            tokens=generation.tokens,
            attempts=generation.attempts,
            **event["timings"],
        )
        if budget_spent:
            assert engine is not None
            self.on_budget_spent(engine, now)
        if engine is not None:
            self.engines.used(engine, now)


def unsupported(needs: dict[str, str], considered: list[EngineState]) -> Refused:
    """``unsupported_parameter``: the message starts with the field (the HTTP front's ``param``), then what it
    needs and what each engine considered can do."""
    capability, name = next(iter(needs.items()))
    engines = "; ".join(
        f"{e.name} ({', '.join(sorted(e.capabilities)) or 'none'})" if e.capabilities is not None else e.name
        for e in considered
    )
    return Refused(
        ErrorCode.UNSUPPORTED_PARAMETER,
        f"{name}: needs an engine with {capability!r}; the engines considered (what each can do) are: {engines}",
    )
