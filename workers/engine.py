"""The engine interface: the narrow waist every inference library is put behind.

An engine module implements :class:`Engine` and is the only module that
imports its library.  The runtime (runtime.py) owns the sockets, the
heartbeats and the request bookkeeping; an engine only loads a model and
turns one request into text pieces.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from .protocol import ErrorCode
from .protocol.messages import Embed, Generate, LoadSpec

# Engine kind -> module implementing it.  Adding an engine is one more module
# here, one more requirements file in config/requirements/, and docs/ENGINES.md.
ENGINE_MODULES = {
    "llamacpp": "workers.llamacpp.engine",
    "exllamav2": "workers.exllamav2.engine",
    "fake": "workers.fake",
    "openai": "workers.remote.engine",
}

ProgressFn = Callable[[float, str], None]  # fraction 0..1, what is happening
StopFn = Callable[[], bool]  # true once the request must stop (cancel, deadline, shutdown)


class EmitFn(Protocol):
    """Sends one piece of generated text and how many tokens it holds.

    An engine may hold text back (a possible stop string, half a UTF-8
    character) or get several tokens at once, so one piece can carry several
    tokens, or none (the rest of a token already counted).  The daemon counts
    the tokens it was sent by ``tokens``, not by pieces, so its count (for
    status, latency per token, a failed request's usage) stays right whatever
    the engine's chunking.
    """

    def __call__(self, text: str, tokens: int = 1) -> None: ...


class EmitWithLogprobs(Protocol):
    """The emit function of a request that asked for logprobs: ``logprobs`` holds one entry per token
    counted in ``tokens`` (Token's, workers/protocol/messages.py)."""

    def __call__(self, text: str, tokens: int = 1, logprobs: Any = ()) -> None: ...


class EngineUnavailable(Exception):
    """This engine cannot run on this machine (no CUDA, a broken build).

    Restarting will not help: the worker exits with ExitCode.UNAVAILABLE.
    """


class ModelError(Exception):
    """The model is missing or will not load: the worker exits with ExitCode.MODEL_ERROR."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.code = ErrorCode.MODEL_NOT_FOUND if missing else ErrorCode.MODEL_LOAD_FAILED


class OutOfGpuMemory(ModelError):
    """The load ran out of GPU memory: the daemon plans a smaller variant or fewer layers, it is no crash."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode.GPU_OUT_OF_MEMORY


class EngineFailed(Exception):
    """The engine cannot go on serving: a remote engine's upstream is unreachable,
    refuses (429, 5xx) or died in the middle of an answer.

    Handled as a crash: the worker reports why (``failed``, or ``load_failed``
    while loading) and exits with ExitCode.CRASH, so the daemon's crash path
    runs: the request is retried elsewhere or ends ``engine_failed`` with its
    tokens, the worker restarts after backoff, the circuit breaker counts it.
    ``retry_after_s``: the upstream's Retry-After, the earliest the daemon
    starts the worker again.
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode.ENGINE_FAILED
        self.retry_after_s = retry_after_s


class RequestError(Exception):
    """A request this engine cannot serve; ``code`` is a protocol ErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class GenerateResult:
    finish_reason: str  # FINISH_STOP, FINISH_LENGTH, or FINISH_CANCELLED when should_stop() ended it
    prompt_tokens: int
    completion_tokens: int


@dataclass
class EmbedResult:
    vectors: list[list[float]]  # one per input, in input order
    prompt_tokens: int  # tokens embedded, all inputs together


# Called by an embedding engine after each decode with the tokens it embedded; True: stop (cancel, deadline,
# shutdown), and the engine returns None.
EmbedProgressFn = Callable[[int], bool]


class EmbeddingEngine(Protocol):
    """An engine that can load a model in embedding mode (the spec's ``embedding``); it then lists the
    ``embeddings`` capability and the daemon sends it embed requests only (workers/embedding.py serves them)."""

    def embed(self, request: Embed, progress: EmbedProgressFn) -> EmbedResult | None:
        """One vector per input, in order; RequestError for an input it cannot take (too long, a bad token)."""


class Engine(Protocol):
    kind: str
    # What it can do beyond plain sampling (messages.CAPABILITIES), read after the load for the ready
    # message: the daemon sends it only requests it can serve (an engine without the attribute lists none).
    capabilities: tuple[str, ...]

    def versions(self) -> dict[str, Any]:
        """Library versions and build facts for the hello message; must not load a model."""

    def load(self, spec: LoadSpec, progress: ProgressFn) -> dict[str, Any]:
        """Load the model described by ``spec``; return facts about it for status."""

    def generate(self, request: Generate, emit: EmitFn, should_stop: StopFn) -> GenerateResult:
        """Generate for one request, calling ``emit(text, tokens)`` per text piece
        and checking ``should_stop`` between tokens."""


class BatchEngine(Engine, Protocol):
    """An engine that generates for several requests at once (sequences in one
    llama.cpp context, decoded as one batch).  The runtime drives it step by
    step (workers/batch.py) when ``slots`` is above 1 after the load; with one
    slot it is driven through ``generate`` like any engine."""

    slots: int  # requests it can run at once, set by load (the spec's "parallel")

    def begin(self, request: Generate, emit: EmitFn) -> None:
        """Take a request into a free slot (its prompt is read in the next step);
        RequestError when it cannot be served (the prompt does not fit, …)."""

    def step(self) -> list[tuple[str, GenerateResult]]:
        """One decode step for every running request: each gets its next piece of
        text through its emit; return the requests that ended in this step."""

    def end(self, request_id: str) -> GenerateResult:
        """Stop a running request now (cancel, deadline, shutdown) and free its slot."""


def load_engine(kind: str) -> Engine:
    """Import the engine module for ``kind`` (and so its library) and build the engine."""
    try:
        module_name = ENGINE_MODULES[kind]
    except KeyError:
        raise EngineUnavailable(f"unknown engine kind {kind!r}; known: {', '.join(sorted(ENGINE_MODULES))}") from None
    module = importlib.import_module(module_name)
    return module.create_engine()


@dataclass
class PreparedEngine:
    """An engine imported before the worker's sockets exist, or why it cannot run here."""

    kind: str
    engine: Engine | None
    versions: dict[str, Any]  # the engine's build facts for the hello message; {} when unavailable
    unavailable: str | None = None  # the EngineUnavailable reason


def prepare_engine(kind: str) -> PreparedEngine:
    """Import the engine library and read its build facts, before anything imports pyzmq.

    A CUDA build of llama.cpp crashed (SIGSEGV in ``llama_model::print_info``)
    when a ZeroMQ context existed before llama_cpp was loaded, so the worker
    calls this first and only then starts its runtime.
    """
    try:
        engine = load_engine(kind)
        return PreparedEngine(kind, engine, engine.versions())
    except EngineUnavailable as exc:
        return PreparedEngine(kind, None, {}, str(exc))
