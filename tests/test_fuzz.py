"""Seeded fuzzing of a real daemon's two sockets.

Eleven thousand hostile frames at the client endpoint from four DEALER
sockets (random bytes, truncated and deeply nested JSON, every field of
every op with wrong types, lone surrogates in every string field and in
keys, huge strings and numbers, unknown ops and fields, oversized frames,
frames over the hard limit), with real tiny generate requests and cancels
among them; each frame is followed by a ping, so the replies before its pong
answer that frame.  Over a thousand forged worker messages from impostor
routing ids at the worker endpoint.  Afterwards the daemon must still run,
hold its memory flat, never have answered ``internal_error`` nor logged an
internal error or a traceback, still have its first llama worker, and serve
a real request.

The frames sent depend on ``SEED`` only; the daemon's timing decides which
of the tiny requests run and which are refused as busy.  On failure the
message says what the frames answered with internal_error were, which
exceptions the daemon logged, and, found on a fresh daemon, a frame that
provokes each exception on its own, made as small as it stays failing.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil
import pytest
import zmq

from supervisor.client import ClientTimeout
from supervisor.config import load_settings

from .conftest import LLAMA, collect

pytestmark = pytest.mark.real_engine

SEED = 20_240_917
MAX_MESSAGE_BYTES = 65_536
HARD_LIMIT = max(4 * MAX_MESSAGE_BYTES, 16 << 20)  # the daemon drops a connection that sends more, unread
GIANT_BYTES = 20_000_000
assert GIANT_BYTES > HARD_LIMIT
WARMUP_MESSAGES = 1_000  # client messages before the memory baseline
CLIENT_MESSAGES = 10_000  # client messages after it
WORKER_MESSAGES = 1_100  # forged worker messages, spread over both phases
RATE = 1_000  # client messages per second: slow enough for the engine to run some of the requests
CLIENT_PEERS = 4
WORKER_MESSAGES_PER_PEER = 25  # then a new impostor socket with another routing id
MARK_EVERY = 1  # a marker ping after this many frames: the replies between two markers answer those frames
RSS_GROWTH_LIMIT = 100 << 20
SEND_TIMEOUT_MS = 5_000
FUZZ_DEADLINE_S = 40.0
SETTLE_S = 10.0
IDLE_WAIT_S = 5.0
FINAL_REQUEST_TIMEOUT_S = 10.0
TRIAGE_S = 12.0
MARK = "~mark"
STORED_FRAME_BYTES = 4_096  # generate frames kept to blame the errors that end accepted requests

PROMPTS = ("Hi", "Hello", "The sky is", "1, 2, 3,", "Once upon a time", "é😀\u4e2d", "\x00\x01\x7f")
OPS = ("generate", "cancel", "status", "ping", "reload")
FieldPath = Any  # a field name, or a tuple path into messages / stop
FIELDS: dict[str, list[FieldPath]] = {
    "generate": [
        "op",
        "id",
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "ignore_eos",
        "stream",
        "deadline_ms",
        "engine",
        ("messages", 0),
        ("messages", 0, "role"),
        ("messages", 0, "content"),
        ("stop", 0),
    ],
    "cancel": ["op", "id", "target"],
    "status": ["op", "id"],
    "ping": ["op", "id"],
    "reload": ["op", "id"],
}
STRING_FIELDS: dict[str, list[FieldPath]] = {
    "generate": [
        "op",
        "id",
        "prompt",
        "engine",
        "stop",
        ("stop", 0),
        ("messages", 0, "role"),
        ("messages", 0, "content"),
    ],
    "cancel": ["op", "id", "target"],
    "status": ["op", "id"],
    "ping": ["op", "id"],
    "reload": ["op", "id"],
}
SURROGATES = ("\udc00", "\ud800", "\udfff", "\udbff")
WORKER_TYPES = ("hello", "loading", "ready", "load_failed", "heartbeat", "token", "done", "error")
WORKER_IDS = (
    b"llama.1",
    b"llama.2",
    b"llama.1/watchdog",
    b"llama.1#deadbeef",
    b"llama.1#deadbeef/watchdog",
    b"llama.0",
    b"broken.1",
    b"llama.1#",
    b"#",
    b"/watchdog",
    b"llama.1#" + b"0" * 32,
)


# --- writing JSON the standard library would not write ------------------------------------


class Raw(str):
    """JSON text written as it is: 1e999, -0, NaN, deep nesting."""


def dump(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(dump(k) + ":" + dump(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)  # ensure_ascii: a lone surrogate is written as a \udc00 escape


def frame_of(message: Any) -> bytes:
    return dump(message).encode("utf-8")


def tag(value: Any) -> str:
    """A short name for the kind of a value, for labels."""
    if isinstance(value, Raw):
        return "raw " + (value[:8] + "…" if len(value) > 8 else value)
    if isinstance(value, str):
        if any("\ud800" <= c <= "\udfff" for c in value):
            return "lone surrogate"
        return "huge string" if len(value) > 1_000 else "string"
    return "null" if value is None else type(value).__name__


def label_path(op: str, path: FieldPath) -> str:
    return op + "." + (path if isinstance(path, str) else ".".join(map(str, path)))


# --- values -----------------------------------------------------------------------------------


def lone_surrogate_text(rng: random.Random) -> str:
    s, high = rng.choice(SURROGATES), rng.choice(SURROGATES[1::2])
    # a high surrogate followed by a low one would be a valid pair: never written here
    return rng.choice(
        [s, "a" + s, s + "b", "x" * rng.randint(1, 50) + s, "\udc00\ud800", high + high, "ok " + s + " ok"]
    )


def huge_string(rng: random.Random) -> str:
    char = rng.choice("xé😀 ")
    return char * rng.randint(1_000, 60_000 // len(json.dumps(char)))  # at most 60,000 bytes as written


def huge_number(rng: random.Random) -> Raw:
    return Raw(
        rng.choice(
            [
                "1e999",
                "-1e999",
                "1E400",
                "1e308",
                "-0",
                "-0.0",
                "0e0",
                "1e-999",
                "NaN",
                "Infinity",
                "-Infinity",
                str(2**70),
                str(-(2**70)),
                str(2**64),
                str(2**32),
                str(2**32 - 1),
                str(2**63),
                "1" * rng.randint(4_000, 5_000),
                "9" * rng.randint(20_000, 40_000),
                "0." + "0" * 5_000 + "1",
            ]
        )
    )


def odd_text(rng: random.Random) -> str:
    """Valid but unusual strings."""
    return rng.choice(
        ["\x00", "\u2028", "\ufeff", "\U0010ffff", "\U0001f600", "   ", "generate\x00", "ping ", "\\", '"', "llama\n"]
    )


def nested_value(rng: random.Random) -> Raw:
    depth = rng.choice([rng.randint(2, 50), rng.randint(900, 1_100)])
    return Raw("[" * depth + "]" * depth) if rng.random() < 0.5 else Raw('{"a":' * depth + "0" + "}" * depth)


_BAD_VALUES: list[Callable[[random.Random], Any]] = [
    lambda r: None,
    lambda r: True,
    lambda r: False,
    lambda r: 0,
    lambda r: -1,
    lambda r: 1.5,
    lambda r: r.randint(-(2**40), 2**40),
    huge_number,
    huge_number,
    lambda r: "",
    lambda r: "x",
    lambda r: r.choice(OPS + ("llama", "user", "system", "broken")),
    lone_surrogate_text,
    lone_surrogate_text,
    huge_string,
    odd_text,
    lambda r: [],
    lambda r: [None],
    lambda r: ["x", 1],
    lambda r: {},
    lambda r: {"role": "user", "content": "x"},
    nested_value,
]


def bad_value(rng: random.Random) -> Any:
    return rng.choice(_BAD_VALUES)(rng)


def random_bytes(rng: random.Random, low: int = 0, high: int = 300) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(low, high)))


# --- client messages: each maker returns (frame, label) ------------------------------------


def tiny_generate(rng: random.Random, mid: str) -> dict[str, Any]:
    """A valid generate that ends quickly: one token, a deadline."""
    message: dict[str, Any] = {"op": "generate", "id": mid, "max_tokens": 1, "deadline_ms": 5_000}
    if rng.random() < 0.7:
        message["prompt"] = rng.choice(PROMPTS)
    else:
        message["messages"] = [{"role": rng.choice(["system", "user"]), "content": rng.choice(PROMPTS)}]
    optional = {
        "temperature": 0.0,
        "top_p": 0.5,
        "top_k": 5,
        "seed": rng.randrange(2**32),
        "stop": ["\n"],
        "stream": rng.random() < 0.5,
        "ignore_eos": rng.random() < 0.5,
        "engine": "llama",
    }
    message.update({k: v for k, v in optional.items() if rng.random() < 0.3})
    return message


def valid_message(rng: random.Random, op: str, mid: str) -> dict[str, Any]:
    if op == "generate":
        return tiny_generate(rng, mid)
    if op == "cancel":
        return {"op": "cancel", "id": mid, "target": f"t{rng.randrange(10_000)}"}
    return {"op": op, "id": mid}


def set_path(message: dict[str, Any], path: FieldPath, value: Any) -> None:
    """Set a field; a path into messages or stop first gives the message that field."""
    if isinstance(path, str):
        message[path] = value
        return
    if path[0] == "messages":
        message.pop("prompt", None)
        message["messages"] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    else:
        message["stop"] = ["\n", "."]
    target = message
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def wrong_field(rng: random.Random, mid: str, op: str, path: FieldPath) -> tuple[bytes, str]:
    """One field of a valid message with a wrong type or value, or missing."""
    message = valid_message(rng, op, mid)
    if isinstance(path, str) and path in message and rng.random() < 0.1:
        del message[path]
        return frame_of(message), f"{label_path(op, path)} missing"
    value = bad_value(rng)
    set_path(message, path, value)
    return frame_of(message), f"{label_path(op, path)} = {tag(value)}"


def surrogate_field(rng: random.Random, mid: str, op: str, path: FieldPath) -> tuple[bytes, str]:
    """A lone surrogate (as a JSON escape) in one string field, or in a key."""
    message = valid_message(rng, op, mid)
    text = lone_surrogate_text(rng)
    where = rng.random()
    if where < 0.6:
        set_path(message, path, text)
        return frame_of(message), f"{label_path(op, path)} = lone surrogate"
    if where < 0.8:
        message[text] = rng.choice([1, "x", None])
        return frame_of(message), f"{op} unknown key with a lone surrogate"
    if where < 0.9 and op == "generate":
        set_path(message, ("messages", 0), {"role": "user", "content": "x", text: "y"})
        return frame_of(message), "generate.messages.0 key with a lone surrogate"
    message = {(text if k == "id" else k): v for k, v in message.items()}
    return frame_of(message), f"{op} id's key a lone surrogate"


def truncated_json(rng: random.Random, mid: str) -> tuple[bytes, str]:
    whole = frame_of(valid_message(rng, rng.choice(OPS), mid))
    if rng.random() < 0.2:
        return whole + rng.choice(
            [b"}", b" x", b"{}", b"\x00", b",", b'{"op":"ping","id":"y"}']
        ), "extra data after JSON"
    return whole[: rng.randrange(len(whole))], "truncated JSON"


def deep_nesting(rng: random.Random, mid: str) -> tuple[bytes, str]:
    depth = rng.choice([rng.randint(900, 1_100), rng.randint(1_100, 10_000)])  # under max_message_bytes
    shape = rng.randrange(5)
    if shape == 0:
        return b"[" * depth + b"]" * depth, "deep nesting [[["
    if shape == 1:
        return b'{"a":' * depth + b"1" + b"}" * depth, 'deep nesting {"a":{"a":'
    if shape == 2:
        return rng.choice([b"[", b'{"a":']) * depth, "deep nesting, never closed"
    nest = "[" * depth + "]" * depth if shape == 3 else '{"a":' * depth + "1" + "}" * depth
    key = rng.choice(["prompt", "stop", "target", "op", "x"])
    return frame_of({"op": rng.choice(OPS), "id": mid, key: Raw(nest)}), "deep nesting in a field"


def wrong_shape(rng: random.Random, mid: str) -> tuple[bytes, str]:
    """Valid JSON that is not an object, or an object of no use."""
    return rng.choice(
        [
            b"[]",
            b"[1,2,3]",
            b"null",
            b"true",
            b"false",
            b"0",
            b"-0",
            b"1e999",
            b'"ping"',
            b'""',
            b"{}",
            b" {} ",
            b'[{"op":"ping","id":"x"}]',
            b'{"":""}',
            b'{"id":null}',
            b'{"op":null,"id":null}',
            b"NaN",
            b"-Infinity",
            b'{"op":"ping","id":"a","op":"generate"}',
            b'{"id":"a","id":"b","op":"ping"}',
        ]
    ), "wrong shape"


def bad_encoding(rng: random.Random, mid: str) -> tuple[bytes, str]:
    """Frames that are not UTF-8 JSON, though close to it."""
    text = dump(valid_message(rng, rng.choice(OPS), mid))
    return rng.choice(
        [
            b"\xef\xbb\xbf" + text.encode(),
            text.encode("utf-16"),
            text.encode("utf-32"),
            text.replace('"', '"\xed\xb0\x80', 1).encode("latin-1"),
            text.encode().replace(b'"', b'"\xc0\xaf', 1),
            text.encode().replace(b'"', b'"\x00', 2),
            text.encode().replace(b'"', b"\xff", 1),
            b"\x80" + text.encode(),
            text.encode().replace(b"}", b"\n\t}"),
            text.replace('"', "'").encode(),
        ]
    ), "bad encoding"


def huge_fields(rng: random.Random, mid: str) -> tuple[bytes, str]:
    op = rng.choice(OPS)
    message = valid_message(rng, op, mid)
    path = rng.choice(FIELDS[op])
    value = huge_string(rng) if rng.random() < 0.5 else huge_number(rng)
    set_path(message, path, value)
    return frame_of(message), f"{label_path(op, path)} = {tag(value)}"


def unknown_things(rng: random.Random, mid: str) -> tuple[bytes, str]:
    if rng.random() < 0.4:
        op = rng.choice(
            [
                "Generate",
                "GENERATE",
                "generate ",
                "stop",
                "shutdown",
                "",
                "cancel\x00",
                "status!",
                "__init__",
                "restart",
                "exit",
                "ping" * 40,
                "\U0001f600",
            ]
        )
        return frame_of({"op": op, "id": mid}), "unknown op"
    op = rng.choice(OPS)
    message = valid_message(rng, op, mid)
    name = rng.choice(
        [
            "max_token",
            "prompts",
            "Op",
            "ID",
            "__proto__",
            "constructor",
            "",
            "id ",
            "op\x00",
            "x" * 2_000,
            "params",
            "worker",
            "type",
            "request_id",
            "\U0001f600",
        ]
    )
    message[name] = bad_value(rng)
    return frame_of(message), f"{op} unknown field"


def oversize(rng: random.Random, mid: str) -> tuple[bytes, str]:
    """Over max_message_bytes, below the hard limit: answered with message_too_large."""
    size = rng.choice(
        [
            MAX_MESSAGE_BYTES + 1,
            MAX_MESSAGE_BYTES + rng.randint(2, 2_000),
            4 * MAX_MESSAGE_BYTES + 1,
            rng.randint(4 * MAX_MESSAGE_BYTES, 2 << 20),
        ]
    )
    prefix = b'{"op":"generate","id":"%s","prompt":"' % mid.encode()
    return prefix + b"x" * (size - len(prefix) - 2) + b'"}', "over max_message_bytes"


CLIENT_KINDS: list[tuple[str, int]] = [
    ("random_bytes", 8),
    ("truncated_json", 8),
    ("deep_nesting", 4),
    ("wrong_shape", 4),
    ("bad_encoding", 4),
    ("wrong_field", 30),
    ("surrogate", 14),
    ("huge", 5),
    ("unknown", 8),
    ("oversize", 1),
    ("multi_frame", 2),
    ("tiny_generate", 1),
    ("cancel", 1),
    ("reuse_id", 1),
    ("plain", 3),
]
SIMPLE_MAKERS: dict[str, Callable[[random.Random, str], tuple[bytes, str]]] = {
    "truncated_json": truncated_json,
    "deep_nesting": deep_nesting,
    "wrong_shape": wrong_shape,
    "bad_encoding": bad_encoding,
    "huge": huge_fields,
    "unknown": unknown_things,
    "oversize": oversize,
    "random_bytes": lambda rng, mid: (random_bytes(rng), "random bytes"),
}


# --- worker messages ----------------------------------------------------------------------------


def worker_message(rng: random.Random, kind: str) -> dict[str, Any]:
    rid = rng.choice(["r1", "r2", f"r{rng.randrange(1_000)}", "", "probe"])
    return {
        "hello": {
            "type": "hello",
            "protocol": rng.choice([1, 2, 0]),
            "engine": "llama",
            "worker_id": rng.choice(["llama.1", "llama.2"]),
            "pid": rng.randrange(1, 1 << 22),
            "python": "3.11.7",
            "executable": "/usr/bin/python3",
            "packages": {},
            "versions": {},
        },
        "loading": {"type": "loading", "progress": rng.random(), "message": "loading"},
        "ready": {"type": "ready", "model": {"model_name": "forged", "n_ctx": 2048}},
        "load_failed": {"type": "load_failed", "code": "model_load_failed", "message": "forged", "exit_code": 65},
        "heartbeat": {
            "type": "heartbeat",
            "phase": rng.choice(["starting", "loading", "idle", "generating"]),
            "request_id": rid,
            "tokens": rng.randrange(100),
            "last_token_age_ms": rng.random() * 1e4,
        },
        "token": {"type": "token", "request_id": rid, "text": rng.choice(PROMPTS), "tokens": rng.randrange(3)},
        "done": {
            "type": "done",
            "request_id": rid,
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            "timings": {"prefill_ms": 1.0, "generate_ms": 2.0},
        },
        "error": {"type": "error", "request_id": rid, "code": "internal_error", "message": "forged"},
    }[kind]


def worker_frames(rng: random.Random) -> list[bytes]:
    roll = rng.random()
    if roll < 0.4:  # as a real worker writes them
        return [frame_of(worker_message(rng, rng.choice(WORKER_TYPES)))]
    if roll < 0.65:  # one field wrong
        message = worker_message(rng, rng.choice(WORKER_TYPES))
        message[rng.choice(list(message))] = bad_value(rng)
        return [frame_of(message)]
    if roll < 0.8:  # the token fast path's exact form
        rid = rng.choice([b"r1", b"r2", b"r%d" % rng.randrange(100)])
        return [
            b'{"type":"token","request_id":"'
            + rid
            + b'","text":'
            + frame_of(rng.choice(PROMPTS + (lone_surrogate_text(rng),)))
            + b"}"
        ]
    if roll < 0.95:  # garbage
        return [
            rng.choice(
                [random_bytes(rng), truncated_json(rng, "w")[0], deep_nesting(rng, "w")[0], wrong_shape(rng, "w")[0]]
            )
        ]
    return [random_bytes(rng, 0, 20), frame_of(worker_message(rng, rng.choice(WORKER_TYPES)))]


def impostor_id(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(WORKER_IDS)
    if roll < 0.8:
        return b"llama.%d#%032x" % (rng.randrange(1, 4), rng.getrandbits(128)) + rng.choice([b"", b"/watchdog"])
    return random_bytes(rng, 1, 255)


# --- the fuzzer -------------------------------------------------------------------------------


class Stalled(Exception):
    """The daemon stopped taking frames, or the fuzzing ran out of time."""


Sent = tuple[str, bytes]  # (label, frame)


@dataclass
class Peer:
    """One DEALER on the client endpoint and the replies it waits for."""

    name: str
    sock: zmq.Socket
    groups: deque[list[Sent]] = field(default_factory=lambda: deque([[]]))  # frames sent between markers
    marks: int = 0
    live: list[str] = field(default_factory=list)  # tiny generates that may still run


@dataclass
class Blame:
    reply: str
    suspects: list[Sent]  # the frames one of which provoked it


class Fuzzer:
    def __init__(self, context: zmq.Context, client_endpoint: str, worker_endpoint: str, rng: random.Random) -> None:
        self.context = context
        self.client_endpoint = client_endpoint
        self.worker_endpoint = worker_endpoint
        self.rng = rng
        self.peers = [Peer(f"c{i}", self._socket(client_endpoint, None)) for i in range(CLIENT_PEERS)]
        self.giant = self._socket(client_endpoint, None)  # the daemon drops it: never read
        self.impostors: list[zmq.Socket] = []
        self.impostor_sent = WORKER_MESSAGES_PER_PEER
        self.seq = itertools.count()
        self.kinds = [k for k, weight in CLIENT_KINDS for _ in range(weight)]
        self.field_cycle = itertools.cycle([(op, path) for op in OPS for path in FIELDS[op]])
        self.string_cycle = itertools.cycle([(op, path) for op in OPS for path in STRING_FIELDS[op]])
        self.generates: dict[tuple[str, str], Sent] = {}  # (peer, id) -> a generate op sent with that id
        self.sent = Counter[str]()
        self.tally = Counter[str]()
        self.replies = 0
        self.internal_errors: list[Blame] = []
        self.bad_replies: list[Blame] = []

    def _socket(self, endpoint: str, routing_id: bytes | None) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        if routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.connect(endpoint)
        return sock

    def _send(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        try:
            sock.send_multipart(frames)
        except zmq.Again:
            raise Stalled(f"a send waited {SEND_TIMEOUT_MS} ms: the daemon stopped reading") from None

    # --- client endpoint ---

    def client_message(self) -> None:
        peer = self.rng.choice(self.peers)
        kind = self.rng.choice(self.kinds)
        mid = f"{peer.name}-{next(self.seq)}"
        frames, label = self._client_frames(peer, kind, mid)
        self._send(peer.sock, frames)
        self.sent["client"] += 1
        self.sent[kind] += 1
        peer.groups[-1].append((label, frames[-1]))
        if len(frames[-1]) <= STORED_FRAME_BYTES and b'"generate"' in frames[-1]:
            self.generates[(peer.name, _id_of(frames[-1]) or mid)] = (label, frames[-1])
        if len(peer.groups[-1]) >= MARK_EVERY:
            self.mark(peer)

    def _client_frames(self, peer: Peer, kind: str, mid: str) -> tuple[list[bytes], str]:
        rng = self.rng
        if kind == "tiny_generate":
            peer.live.append(mid)
            return [frame_of(tiny_generate(rng, mid))], "tiny generate"
        # The same random draws whatever requests are still running, so the sequence depends on the seed only.
        pick, live = rng.randrange(1 << 30), rng.random() < 0.8 and peer.live
        if kind == "cancel":
            target = live[pick % len(live)] if live else f"t{pick % 100}"
            return [frame_of({"op": "cancel", "id": mid, "target": target})], "cancel"
        if kind == "reuse_id":  # a running request's id again, with any op
            op = rng.choice(OPS)
            return [frame_of(valid_message(rng, op, live[pick % len(live)] if live else mid))], f"{op} reusing an id"
        if kind == "plain":
            op = rng.choice(["status", "ping", "ping", "cancel"])
            return [frame_of(valid_message(rng, op, mid))], op
        if kind == "multi_frame":
            op = rng.choice(["ping", "status", "cancel"])
            extra = [random_bytes(rng, 0, 8) for _ in range(rng.randint(1, 3))]
            return extra + [frame_of(valid_message(rng, op, mid))], f"{op} after extra frames"
        if kind == "wrong_field":
            frame, label = wrong_field(rng, mid, *next(self.field_cycle))
        elif kind == "surrogate":
            frame, label = surrogate_field(rng, mid, *next(self.string_cycle))
        else:
            frame, label = SIMPLE_MAKERS[kind](rng, mid)
        return [frame], label

    def mark(self, peer: Peer) -> None:
        peer.marks += 1
        self._send(peer.sock, [frame_of({"op": "ping", "id": f"{MARK}-{peer.marks}"})])
        peer.groups.append([])

    def giant_frame(self, endpoint: str) -> None:
        """Over the hard limit: the daemon drops the connection without reading it (no reply)."""
        if endpoint == self.client_endpoint:
            sock = self.giant
        else:
            sock = self._socket(endpoint, b"llama.1#giant")
            self.impostors.append(sock)
        self._send(sock, [b'{"op":"ping","id":"giant","x":"' + b"x" * (GIANT_BYTES - 32) + b'"}'])
        self.sent["giant"] += 1

    def recycle(self, index: int) -> None:
        """Disconnect a client with requests under way (they must be cancelled) and connect a new one."""
        self.peers[index].sock.close(0)
        self.peers[index] = Peer(f"c{index}r{next(self.seq)}", self._socket(self.client_endpoint, None))

    # --- worker endpoint ---

    def worker_message(self) -> None:
        if self.impostor_sent >= WORKER_MESSAGES_PER_PEER:
            self.impostors.append(self._socket(self.worker_endpoint, impostor_id(self.rng)))
            self.impostor_sent = 0
        self._send(self.impostors[-1], worker_frames(self.rng))
        self.impostor_sent += 1
        self.sent["worker"] += 1

    # --- replies ---

    def drain(self, timeout_s: float = 0.0) -> None:
        """Read every reply waiting, waiting at most timeout_s for the first."""
        ready = zmq.select([p.sock for p in self.peers], [], [], timeout_s)[0] if timeout_s > 0 else None
        for peer in self.peers:
            if ready is not None and peer.sock not in ready:
                continue
            while peer.sock.poll(0, zmq.POLLIN):
                self.on_reply(peer, peer.sock.recv_multipart(zmq.NOBLOCK))

    def on_reply(self, peer: Peer, frames: list[bytes]) -> None:
        self.replies += 1
        try:
            event = json.loads(frames[-1])
            assert isinstance(event, dict)
        except (ValueError, AssertionError):
            self.bad_replies.append(Blame(repr(frames[-1][:300]), list(peer.groups[0])))
            return
        kind, code, eid = event.get("event"), event.get("code"), event.get("id")
        self.tally[f"{kind}:{code}" if code else str(kind)] += 1
        if kind == "pong" and isinstance(eid, str) and eid.startswith(MARK):
            if len(peer.groups) > 1:
                peer.groups.popleft()
            return
        if kind in ("done", "error") and eid in peer.live:
            peer.live.remove(eid)
        if code != "internal_error":
            return
        # Tokens and the ends of accepted requests come whenever; any other reply answers the oldest unmarked group.
        if kind == "error" and "timings" in event:
            sent = self.generates.get((peer.name, eid))
            suspects = [sent] if sent else []
        else:
            suspects = list(peer.groups[0])
        self.internal_errors.append(Blame(json.dumps(event)[:300], suspects))

    def settle(self, timeout_s: float) -> bool:
        """Mark every peer and read until every marker is answered (or the time is up)."""
        for peer in self.peers:
            self.mark(peer)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.drain(0.05)
            if all(len(p.groups) == 1 for p in self.peers):
                return True
        return False

    def close(self) -> None:
        for sock in [p.sock for p in self.peers] + self.impostors + [self.giant]:
            sock.close(0)


def _id_of(frame: bytes) -> str | None:
    try:
        value = json.loads(frame).get("id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


def run_phase(fuzz: Fuzzer, count: int, worker_count: int, giants: dict[int, str], deadline: float) -> None:
    """``count`` client messages at RATE, ``worker_count`` worker messages spread among them."""
    worker_every = max(1, count // max(1, worker_count))
    started = time.monotonic()
    for i in range(count):
        fuzz.client_message()
        if worker_count and i % worker_every == 0:
            fuzz.worker_message()
        if i in giants:
            fuzz.giant_frame(giants[i])
        fuzz.drain()
        while (ahead := started + (i + 1) / RATE - time.monotonic()) > 0:
            fuzz.drain(ahead)
        if time.monotonic() > deadline:
            raise Stalled(f"only {i} of {count} messages of a phase sent in the time allowed")


# --- after the run ------------------------------------------------------------------------------


def wait_idle(daemon: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            engine = daemon.engine("llama")
        except ClientTimeout:
            continue
        if engine["in_flight"] == 0 and engine["queue_depth"] == 0:
            return
        time.sleep(0.1)


def log_problems(log_text: str) -> tuple[list[str], Counter[str]]:
    """Lines naming an internal error or holding a traceback, and their exceptions by kind and call chain."""
    lines = [line for line in log_text.splitlines() if "internal error" in line.lower() or "Traceback" in line]
    kinds = Counter[str]()
    worker_lines: list[str] = []
    for line in log_text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "exception" in record:
            trace = record["exception"].strip().splitlines()
            chain = ">".join(m.group(1) for m in (re.search(r", in (\w+)", t) for t in trace) if m)
            kinds[f"{record.get('event')}: {trace[-1].split(':')[0]} in {chain}"] += 1
        elif record.get("event_kind") == "worker.output":
            worker_lines.append(str(record.get("event")))
    for i, text in enumerate(worker_lines):  # a worker's traceback: its last line is the exception
        if text.startswith("Traceback"):
            end = next((t for t in worker_lines[i + 1 : i + 40] if t and not t.startswith(" ")), "?")
            kinds[f"worker traceback: {end[:160]}"] += 1
    return lines, kinds


def reproduce(endpoint: str, frame: bytes, timeout_s: float) -> list[dict[str, Any]]:
    """Send one frame on a new connection; its replies (for an accepted request, up to its end)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(frame)
    sock.send(frame_of({"op": "ping", "id": MARK}))
    mid, marked, ended = _id_of(frame), False, False
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while (
            not (marked and (ended or mid is None))
            and (left := deadline - time.monotonic()) > 0
            and sock.poll(max(1, int(left * 1000)))
        ):
            event = json.loads(sock.recv_multipart()[-1])
            if event.get("id") == MARK:
                marked, ended = True, ended or bool(replies)  # answered before the marker: that was all
                continue
            replies.append(event)
            ended = ended or (event.get("id") == mid and event.get("event") != "token")
    finally:
        sock.close(0)
    return replies


def provoked(daemon: Any, frame: bytes) -> set[str]:
    """The exceptions the daemon logs when this frame, sent alone, gets internal_error (else nothing)."""
    offset = daemon.output_path.stat().st_size
    replies = reproduce(daemon.endpoint, frame, 2.0)
    errors = [e for e in replies if e.get("code") == "internal_error"]
    if not errors:
        return set()
    if any("timings" in e for e in errors):
        time.sleep(0.2)  # a worker's traceback reaches the log through its output relay
    with open(daemon.output_path, "rb") as log:
        log.seek(offset)
        kinds = set(log_problems(log.read().decode(errors="replace"))[1])
    return kinds or {"internal_error, nothing logged"}


def nesting(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def shallowest_nesting(daemon: Any, kind: str, deadline: float) -> bytes | None:
    """The least deep [[...]] that provokes ``kind`` (bisected)."""
    low, high = 1, 10_000
    if kind not in provoked(daemon, nesting(high)):
        return None
    while low < high and time.monotonic() < deadline:
        middle = (low + high) // 2
        low, high = (low, middle) if kind in provoked(daemon, nesting(middle)) else (middle + 1, high)
    return nesting(high)


def minimise(daemon: Any, frame: bytes, kind: str, deadline: float) -> bytes:
    """Drop fields and shorten strings while the frame still provokes ``kind``."""
    try:
        message = json.loads(frame)
        frame_of(message)
    except (ValueError, RecursionError):
        return frame
    if not isinstance(message, dict):
        return frame
    for key in list(message):
        if time.monotonic() > deadline:
            break
        value = message.pop(key)
        if kind in provoked(daemon, frame_of(message)):
            continue
        message[key] = value
        if isinstance(value, str) and len(value) > 1:
            message[key] = next((c for c in value if "\ud800" <= c <= "\udfff"), "x")
            if kind not in provoked(daemon, frame_of(message)):
                message[key] = value
    return frame_of(message)


def show(frame: bytes) -> str:
    depth = len(frame) // 2
    if len(frame) > 2 and frame == nesting(depth):
        return f'b"[" * {depth} + b"]" * {depth}'
    return repr(frame if len(frame) <= 300 else frame[:150] + b"...(%d bytes)..." % len(frame) + frame[-50:])


def triage(daemon: Any, suspects: list[Sent], budget_s: float) -> list[str]:
    """On a fresh daemon: for each exception, one frame that provokes it when sent alone, made small.

    One frame per label is tried; frames that are not generate ops go first,
    and generate ops with a lone surrogate last: one that wedges the engine
    must not hide the others."""
    deadline = time.monotonic() + budget_s
    order = sorted(set(suspects), key=lambda s: (b'"generate"' in s[1], "surrogate" in s[0], s[0], len(s[1])))
    found: list[str] = []
    labels: set[str] = set()
    kinds: set[str] = set()
    for label, frame in order:
        if label in labels or time.monotonic() > deadline:
            continue
        labels.add(label)
        for kind in sorted(provoked(daemon, frame) - kinds):
            kinds.add(kind)
            small = shallowest_nesting(daemon, kind, deadline) if "RecursionError" in kind else None
            small = small or minimise(daemon, frame, kind, deadline)
            found.append(f"{kind}\n      ({label}) {show(small)}")
    return found


def test_fuzz_client_and_worker_endpoints(make_daemon):
    rng = random.Random(SEED)
    print(f"fuzz seed {SEED}")
    started = time.monotonic()
    daemon = make_daemon({"llama": LLAMA}, max_message_bytes=MAX_MESSAGE_BYTES)
    worker_endpoint = load_settings(daemon.config_path).worker_endpoint  # ipc://<state_dir>/run/workers.sock
    status = daemon.status()
    worker_before = next(e for e in status["engines"] if e["name"] == "llama")["workers"][0]
    assert worker_before["state"] == "ready" and worker_before["pid"], worker_before
    process = psutil.Process(status["daemon"]["pid"])
    context = zmq.Context()
    fuzz = Fuzzer(context, daemon.endpoint, worker_endpoint, rng)
    problems: list[str] = []
    rss_warm = rss_after = None
    try:
        deadline = time.monotonic() + FUZZ_DEADLINE_S
        worker_warmup = WORKER_MESSAGES * WARMUP_MESSAGES // (WARMUP_MESSAGES + CLIENT_MESSAGES)
        run_phase(fuzz, WARMUP_MESSAGES, worker_warmup, {}, deadline)
        fuzz.settle(SETTLE_S)
        rss_warm = process.memory_info().rss
        third = CLIENT_MESSAGES // 3
        giants = {third // 4: daemon.endpoint, third // 2: worker_endpoint, 3 * third // 4: daemon.endpoint}
        run_phase(fuzz, third, WORKER_MESSAGES // 3, giants, deadline)
        fuzz.recycle(0)
        run_phase(fuzz, CLIENT_MESSAGES - third, WORKER_MESSAGES - worker_warmup - WORKER_MESSAGES // 3, {}, deadline)
        if not fuzz.settle(SETTLE_S):
            problems.append(f"markers sent at the end were not all answered within {SETTLE_S}s")
        rss_after = process.memory_info().rss
    except Stalled as exc:
        problems.append(f"fuzzing stopped: {exc}")
    except psutil.NoSuchProcess:
        pass
    fuzz.close()
    context.destroy(0)
    print(
        f"sent {dict(fuzz.sent)}\n{fuzz.replies} replies: {dict(fuzz.tally.most_common())}\nfuzzing done at {time.monotonic() - started:.1f}s"
    )

    alive = daemon.process.poll() is None
    if not alive:
        problems.append(f"the daemon exited with {daemon.process.returncode}:\n{daemon.log_tail()}")
    if rss_warm is not None and rss_after is not None:
        print(f"daemon RSS after the warm-up {rss_warm >> 20} MiB, after the run {rss_after >> 20} MiB")
        if rss_after - rss_warm > RSS_GROWTH_LIMIT:
            problems.append(
                f"daemon RSS grew by {(rss_after - rss_warm) >> 20} MiB after the warm-up (limit {RSS_GROWTH_LIMIT >> 20} MiB)"
            )
    if fuzz.internal_errors:
        labels = Counter(label for blame in fuzz.internal_errors for label in {s[0] for s in blame.suspects})
        problems.append(
            f"{len(fuzz.internal_errors)} replies with code internal_error, e.g. {fuzz.internal_errors[0].reply}; "
            f"what the frames they answer were (count of replies):\n"
            + "\n".join(f"    {n:5d}  {label}" for label, n in labels.most_common(30))
        )
    if fuzz.bad_replies:
        problems.append(f"{len(fuzz.bad_replies)} replies that are not JSON objects, e.g. {fuzz.bad_replies[0].reply}")

    if alive:
        wait_idle(daemon, IDLE_WAIT_S)
        try:
            _, end = collect(daemon.client(timeout_s=FINAL_REQUEST_TIMEOUT_S).generate(prompt="Hello", max_tokens=8))
            if end["event"] != "done":
                problems.append(f"a real request after the fuzzing ended with {end}")
        except ClientTimeout as exc:
            problems.append(f"a real request after the fuzzing got no answer: {exc}")
        try:
            worker_after = daemon.engine("llama")["workers"][0]
        except ClientTimeout as exc:
            problems.append(f"status after the fuzzing got no answer: {exc}")
        else:
            if worker_after["restarts"] != 0 or worker_after["pid"] != worker_before["pid"]:
                problems.append(
                    f"the llama worker was restarted: restarts {worker_after['restarts']}, pid {worker_before['pid']} -> "
                    f"{worker_after['pid']}, last exit {worker_after['last_exit']}"
                )

    bad_lines, exception_kinds = log_problems(daemon.log_text())
    if bad_lines:
        problems.append(
            f"{len(bad_lines)} daemon log lines naming an internal error or holding a traceback; exceptions (count):\n"
            + "\n".join(f"    {n:5d}  {kind}" for kind, n in exception_kinds.most_common())
            + f"\n  first line: {bad_lines[0][:500]}"
        )
    if problems:
        suspects = [s for blame in fuzz.internal_errors for s in blame.suspects] + list(fuzz.generates.values())
        found = triage(make_daemon({"llama": LLAMA}, max_message_bytes=MAX_MESSAGE_BYTES), suspects, TRIAGE_S)
        problems.append(
            "on a fresh daemon, for each exception logged, a frame that provokes it alone (made small):\n"
            + "\n".join("    " + f for f in found)
        )
    print(f"fuzz test took {time.monotonic() - started:.1f}s")
    assert not problems, f"seed {SEED}:\n" + "\n".join(problems)
