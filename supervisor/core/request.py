"""What the router queues and dispatches: a client's request, or a liveness probe.

Both are a :class:`Generation` (one run of an engine, with its dispatch and
token bookkeeping); only a :class:`ClientRequest` has somebody to answer.  A
generation is finished exactly once: ``finish`` returns False for every later
attempt, which is how "one terminal event per request" holds whatever
workers, deadlines and cancels do at the same time.  Pure: time is an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers import protocol as p
from workers.protocol import token_event_prefix

from .validate import GenerateParams


@dataclass(eq=False, kw_only=True)
class Generation:
    params: GenerateParams
    received_at: float
    engine: str = ""  # engine serving it (set when queued)
    wire_id: str = ""  # the id the worker knows it by; new at every dispatch
    worker_token_prefix: bytes = b""  # how the worker's token messages for wire_id begin
    worker_id: str | None = None
    dispatched_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0  # tokens generated (an event may carry several)
    token_events: int = 0  # token events sent to the client (their "index")
    attempts: int = 0
    load_ms: float | None = None  # the load of its engine's model it waited for (part of its ttft)
    cancelled: bool = False  # the client cancelled it while it ran: it ends cancelled, never retried
    finished: bool = False

    @property
    def deadline_at(self) -> float | None:
        deadline_ms = self.params.deadline_ms
        return None if deadline_ms is None else self.received_at + deadline_ms / 1000

    def finish(self) -> bool:
        """Mark finished; True only the first time."""
        if self.finished:
            return False
        self.finished = True
        return True

    def timings(self, now: float) -> dict[str, float | None]:
        def ms(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else round((end - start) * 1000, 3)

        return {
            "queued_ms": ms(self.received_at, self.dispatched_at or now),
            "ttft_ms": ms(self.received_at, self.first_token_at),
            "total_ms": ms(self.received_at, now),
            **({"load_ms": self.load_ms} if self.load_ms is not None else {}),
        }

    def done_event(
        self,
        finish_reason: str,
        usage: dict[str, Any],
        worker_timings: dict[str, Any],
        now: float,
        tool_calls: tuple[dict[str, Any], ...] | None = None,
    ) -> dict[str, Any]:
        """The terminal event of a generation that ended well (or cancelled); with the worker's tool calls."""
        prompt_tokens = usage.get("prompt_tokens", 0)
        completion_tokens = usage.get("completion_tokens", self.tokens)
        event: dict[str, Any] = {
            "event": p.EVENT_DONE,
            "finish_reason": finish_reason,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": (prompt_tokens or 0) + (completion_tokens or 0),
            },
            "timings": self.timings(now),
        }
        if "prefill_ms" in worker_timings:
            event["timings"]["prefill_ms"] = worker_timings["prefill_ms"]
        if isinstance(self, ClientRequest) and not self.params.stream and self.params.input is None:
            event["text"] = "".join(self.text)
            if self.params.sampling.logprobs:
                event["logprobs"] = self.logprobs
        if tool_calls:
            event["tool_calls"] = list(tool_calls)
        return event

    def embeddings_event(self, vectors: Any, prompt_tokens: int, now: float) -> dict[str, Any]:
        """The terminal event of an embed op: one vector per input, in input order."""
        return {
            "event": p.EVENT_EMBEDDINGS,
            "embeddings": vectors,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            "timings": self.timings(now),
        }

    def error_event(self, code: str, message: str, now: float, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        event: dict[str, Any] = {"event": p.EVENT_ERROR, "code": code, "message": message, "timings": self.timings(now)}
        if usage is not None:
            event["usage"] = usage
        return event

    def engine_ttft_ms(self) -> float | None:
        """Dispatch to first token: the engine's own latency, without the queue."""
        if self.first_token_at is None or self.dispatched_at is None:
            return None
        return round((self.first_token_at - self.dispatched_at) * 1000, 3)


@dataclass(eq=False, kw_only=True)
class ClientRequest(Generation):
    client: bytes  # the client's routing envelope, joined: with id, the request's key
    id: str  # the client's id for it
    envelope: list[bytes] = field(default_factory=list)  # routing frames for replies
    text: list[str] = field(default_factory=list)  # kept for stream=false
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # kept for stream=false, when asked
    token_event_prefix: bytes = field(init=False)  # how this request's token events to the client begin

    def __post_init__(self) -> None:
        self.token_event_prefix = token_event_prefix(self.id)

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.client, self.id)


@dataclass(eq=False, kw_only=True)
class Probe(Generation):
    """A one-token liveness probe of an idle worker: nobody to answer, the supervisor judges it."""

    id: str
