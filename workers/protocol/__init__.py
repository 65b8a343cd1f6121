"""The one definition of the wire format (standard library only).

Both ZeroMQ conversations use the same encoding: every message is a single
frame holding one UTF-8 JSON object.

* Client <-> daemon: the client's DEALER talks to the daemon's ROUTER.  A
  client message carries ``op``; every daemon reply carries ``event`` and the
  ``id`` of the client message it answers.  See docs/PROTOCOL.md.
* Worker <-> daemon: the worker's DEALER (routing id = worker id) talks to the
  daemon's worker ROUTER.  Messages carry ``type``.

The daemon and the client import this module; it imports nothing of theirs, so
a worker environment can import it without the daemon's dependencies.
"""

from __future__ import annotations

import json
from typing import Any

# Part of this module's interface: which strings are text (text.py); the typed messages and the
# sampling settings with their defaults (messages.py).
from .messages import (  # noqa: F401
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    PROTOCOL_VERSION,
    Token,
)
from .text import MAX_LABEL_LENGTH, field_label, invalid_text_path, is_text  # noqa: F401

# --- client ops and events -------------------------------------------------

OP_GENERATE = "generate"
OP_CANCEL = "cancel"
OP_STATUS = "status"
OP_PING = "ping"
OP_RELOAD = "reload"  # read the configuration again and apply it (as SIGHUP)
OP_LOAD = "load"  # load an engine's model now (keep_alive: how long it then stays idle)
OP_UNLOAD = "unload"  # unload an engine's model (or all) once its requests have finished
OP_PS = "ps"  # the models: available, loaded, where, how much memory, unload in
OP_EMBED = "embed"  # one vector per input, from an engine with the embeddings capability
CLIENT_OPS = (OP_GENERATE, OP_CANCEL, OP_STATUS, OP_PING, OP_RELOAD, OP_LOAD, OP_UNLOAD, OP_PS, OP_EMBED)

EVENT_TOKEN = "token"
EVENT_DONE = "done"
EVENT_ERROR = "error"
EVENT_STATUS = "status"
EVENT_PONG = "pong"
EVENT_CANCEL_ACK = "cancel_ack"
EVENT_RELOADED = "reloaded"
EVENT_LOAD_ACK = "load_ack"  # engine, state (loading, ready, or waiting for memory), keep_alive_s
EVENT_UNLOAD_ACK = "unload_ack"  # engines: [{engine, state, pending}]
EVENT_PS = "ps"  # models: [...], unavailable: [...], problems: [...]
EVENT_EMBEDDINGS = "embeddings"  # an embed op's end: embeddings (one vector per input, in order), usage
TERMINAL_EVENTS = (EVENT_DONE, EVENT_EMBEDDINGS, EVENT_ERROR)

FINISH_STOP = "stop"  # end-of-generation token or a stop string
FINISH_LENGTH = "length"  # max_tokens reached (or the context is full)
FINISH_CANCELLED = "cancelled"  # a cancel op, or the client went away
FINISH_TOOL_CALLS = "tool_calls"  # the output was tool calls: the done event's tool_calls

MAX_SLOTS = 64  # the most requests one worker may generate at once (an engine's `parallel`)

# --- error codes (client-facing; docs/PROTOCOL.md lists each) ---------------


class ErrorCode:
    """Every error code the daemon sends to clients."""

    MALFORMED = "malformed_message"  # not UTF-8 JSON, or not an object
    TOO_LARGE = "message_too_large"  # frame larger than max_message_bytes
    UNKNOWN_OP = "unknown_op"  # "op" missing or not one of CLIENT_OPS
    INVALID_REQUEST = "invalid_request"  # a field missing, of a wrong type or out of range
    DUPLICATE_ID = "duplicate_id"  # the client reused the id of a request still running
    UNKNOWN_ENGINE = "unknown_engine"  # "engine" names no configured engine
    MODEL_NOT_FOUND = "model_not_found"  # the engine's model file does not exist
    MODEL_LOAD_FAILED = "model_load_failed"  # the model file exists but the engine cannot load it
    GPU_OUT_OF_MEMORY = "gpu_out_of_memory"  # a load found too little GPU memory (a worker's load_failed code; the daemon plans smaller)
    ENGINE_UNAVAILABLE = "engine_unavailable"  # the engine cannot serve (failed, unavailable)
    NO_ENGINE = "no_engine_available"  # no configured engine can serve at all
    INSUFFICIENT_MEMORY = "insufficient_memory"  # no GPU has room for the model, even after evicting idle ones
    BUSY = "busy"  # the engine's queue is full
    BUDGET_EXHAUSTED = (
        "budget_exhausted"  # the engine spent its daily_budget today; unpinned requests go to the next engine
    )
    DEADLINE = "deadline_exceeded"  # deadline_ms passed before the request finished
    ENGINE_FAILED = "engine_failed"  # the worker died or failed during the request
    CONTEXT_OVERFLOW = "context_overflow"  # the prompt does not fit the context window
    UNSUPPORTED_PARAMETER = "unsupported_parameter"  # no engine that could serve it can do what a parameter asks
    SHUTTING_DOWN = "shutting_down"  # the daemon is stopping
    NOT_READY = "not_ready"  # the daemon is still starting (building environments, assembling the model)
    INVALID_CONFIG = "invalid_config"  # a reload found the configuration invalid; the running one stays
    INTERNAL = "internal_error"  # a bug: reported, logged, and the daemon goes on


# --- worker <-> daemon messages: messages.py defines each one (a dataclass with its wire type) ---

# The worker's second socket, which carries heartbeats both ways (see
# workers/runtime.py), has the worker id plus this suffix as its routing id.
WATCHDOG_SUFFIX = "/watchdog"


def watchdog_identity(worker_id: str) -> str:
    return worker_id + WATCHDOG_SUFFIX


# The daemon hands each worker it spawns a secret in this environment variable
# (never on the command line, which any local user can read with ps).  The
# worker puts it in its routing ids, so a local process that merely knows a
# worker id cannot speak for that worker; the watchdog socket's routing id is
# ``watchdog_identity(worker_routing_id(...))``.
WORKER_SECRET_ENV = "NODESUP_WORKER_SECRET"
SECRET_SEPARATOR = "#"
# On a tcp worker endpoint (CURVE), also: "<server public> <worker public> <worker secret>", Z85.
WORKER_CURVE_ENV = "NODESUP_WORKER_CURVE"


def worker_routing_id(worker_id: str, secret: str | None) -> str:
    """The main socket's routing id: ``<worker id>#<secret>``, or the bare worker id without a secret."""
    return f"{worker_id}{SECRET_SEPARATOR}{secret}" if secret else worker_id


# --- worker exit codes (protocol: they decide whether a restart can help) ---


class ExitCode:
    """Every process exit code of the project, from sysexits.h where one fits.

    A worker's code is protocol: it decides whether a restart can help.  The
    daemon and the CLI use the same names: ``node-supervisor`` exits CONFIG
    for a configuration problem (systemd's RestartPreventExitStatus=78),
    TEMPFAIL when another daemon holds the state directory or an endpoint,
    UNAVAILABLE when it cannot prepare (environments) or reach the daemon.
    """

    OK = 0
    CRASH = 1  # uncaught exception: restart may help
    USAGE = 64  # bad command line (EX_USAGE)
    MODEL_ERROR = 65  # model file missing or unloadable (EX_DATAERR): the circuit opens at once
    NO_INPUT = 66  # cli: what it was to read is not there, e.g. no log directory (EX_NOINPUT)
    UNAVAILABLE = 69  # engine cannot run here, e.g. no CUDA (EX_UNAVAILABLE): do not retry
    PROTOCOL_MISMATCH = 76  # daemon speaks another protocol version (EX_PROTOCOL)
    CONFIG = 78  # invalid configuration (EX_CONFIG): do not retry
    TEMPFAIL = 75  # daemon: the state directory or an endpoint is in use (EX_TEMPFAIL): try later
    ORPHANED = 75  # worker: the daemon went away (EX_TEMPFAIL)


# Exits after which the same start would fail the same way: the engine is
# marked failed without a restart.  A model error is not among them: the file
# can be fixed, and the circuit breaker's probe notices.
NO_RETRY_EXIT_CODES = frozenset({ExitCode.UNAVAILABLE, ExitCode.PROTOCOL_MISMATCH, ExitCode.CONFIG})


class DecodeError(ValueError):
    """A frame that is not one UTF-8 JSON object."""


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
_string_literal = json.encoder.encode_basestring  # type: ignore[attr-defined]


def encode_string(text: str) -> bytes:
    """One JSON string literal, as ``encode`` writes strings: for building frames by hand on hot paths."""
    return _string_literal(text).encode("utf-8")


def encode(message: dict[str, Any]) -> bytes:
    """Encode one message as a compact UTF-8 JSON frame.

    Text that is not Unicode (a lone UTF-16 surrogate, which JSON's ``\\u``
    escapes can carry in) has no UTF-8 form; such a message is written with
    ASCII escapes instead, still valid JSON, so that a reply echoing bad input
    never becomes a second failure while the first is being reported.
    """
    text = _ENCODER.encode(message)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _ASCII_ENCODER.encode(message).encode("ascii")


TOKEN_FRAME_START = b'{"type":"token",'
_TOKEN_FRAME_ID_START = TOKEN_FRAME_START + b'"request_id":"'


def token_frame_prefix(request_id: str) -> bytes:
    """A worker's token message up to its text: the frame is this, the text's
    JSON string literal, and ``}``.  Worker and daemon build and read token
    messages with it, so the commonest message costs no JSON work either side;
    a token message in any other (valid JSON) form is still understood."""
    return encode({"type": Token.TYPE, "request_id": request_id, "text": ""})[:-3]


def token_frame_request_id(frame: bytes) -> str | None:
    """The request id of a fast-form token frame, not decoded (wire ids are plain ASCII:
    it ends at the next quote); None for other frames.  Callers check the whole prefix."""
    if not frame.startswith(_TOKEN_FRAME_ID_START):
        return None
    end = frame.find(b'"', len(_TOKEN_FRAME_ID_START))
    return frame[len(_TOKEN_FRAME_ID_START) : end].decode("ascii", "replace") if end > 0 else None


def token_event_prefix(request_id: str) -> bytes:
    """A client token event up to its text; then the text literal, ``,"index":N}``."""
    return encode({"id": request_id, "event": EVENT_TOKEN, "text": ""})[:-3]


def decode(frame: bytes) -> dict[str, Any]:
    """Decode one frame; raise DecodeError unless it is a JSON object.

    JSON nested deeper than the interpreter's recursion limit is a DecodeError
    too (json raises RecursionError): the sender's fault, not the reader's.
    """
    try:
        message = json.loads(frame.decode("utf-8"))
    except RecursionError:
        raise DecodeError("not UTF-8 JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(message, dict):
        raise DecodeError(f"expected a JSON object, got {type(message).__name__}")
    return message
