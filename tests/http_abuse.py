"""Hostile and broken HTTP clients on raw sockets, for tests/test_door.py and the soak (tests/soak.py).

Every connection goes to loopback; every wait is bounded.  Malformed bodies
are test_fuzz's frames (its makers), sent as HTTP bodies instead of ZeroMQ
frames.  Each abuse returns the status the daemon answered, or None when it
closed the connection without an answer (or the client left first).
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Callable

from .test_fuzz import FIELDS, OPS, SIMPLE_MAKERS, STRING_FIELDS, random_bytes, surrogate_field, wrong_field

PATHS = ("/v1/chat/completions", "/v1/completions")
IO_TIMEOUT_S = 5.0


def connect(address: tuple[str, int], source: str = "127.0.0.1", timeout_s: float = IO_TIMEOUT_S) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def head(method: str, path: str, length: int | None, extra: str = "", content_type: str = "application/json") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def read_answer(sock: socket.socket, timeout_s: float = IO_TIMEOUT_S) -> tuple[int | None, dict[str, str], bytes]:
    """(status, headers, body) of one answer; (None, {}, b"") when the connection closes first."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, {}, b""
            data += chunk
        top, _, rest = data.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest[:length]
    except (TimeoutError, ConnectionError, ValueError, IndexError):
        return None, {}, b""


def request(
    address: tuple[str, int], path: str, body: bytes, source: str = "127.0.0.1", method: str = "POST"
) -> tuple[int | None, dict[str, str], bytes]:
    with connect(address, source) as sock:
        sock.sendall(head(method, path, len(body), "Connection: close\r\n") + body)
        return read_answer(sock)


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """True once the daemon closes the connection (EOF or reset), within timeout_s; what it sends is read and dropped."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True
    return False


# --- one abuse each: (rng, address, limit) -> status or None ----------------------------------------

Abuse = Callable[[random.Random, tuple[str, int], int], "int | None"]


def malformed_body(rng: random.Random, address: tuple[str, int], limit: int) -> int | None:
    """A frame test_fuzz sends to the ZeroMQ socket, as the body of a completion request."""
    kind = rng.choice(list(SIMPLE_MAKERS) + ["wrong_field", "surrogate"])
    mid = f"h{rng.randrange(1 << 30)}"
    if kind == "wrong_field":
        op = rng.choice(OPS)
        frame, _ = wrong_field(rng, mid, op, rng.choice(FIELDS[op]))
    elif kind == "surrogate":
        op = rng.choice(OPS)
        frame, _ = surrogate_field(rng, mid, op, rng.choice(STRING_FIELDS[op]))
    else:
        frame, _ = SIMPLE_MAKERS[kind](rng, mid)
    return request(address, rng.choice(PATHS), frame[: 2 * limit])[0]


def garbage_request_line(rng: random.Random, address: tuple[str, int], limit: int) -> int | None:
    line = rng.choice([random_bytes(rng, 1, 200), b"GET", b"POST /v1/completions HTTP/9.9", b"\x00\xff / HTTP/1.1"])
    with connect(address) as sock:
        sock.sendall(line + b"\r\n\r\n")
        return read_answer(sock)[0]


def odd_method_or_path(rng: random.Random, address: tuple[str, int], limit: int) -> int | None:
    method = rng.choice(["DELETE", "PUT", "PATCH", "OPTIONS", "GET", "POST"])
    path = rng.choice(
        ["/", "/v1", "/v1/models/" + "x" * 3000, "/%ff%fe", "/v1/chat/completions?x=" + "é" * 10, "/..//"]
    )
    return request(address, path, b"{}", method=method)[0]


def wrong_content_type(rng: random.Random, address: tuple[str, int], limit: int) -> int | None:
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}).encode()
    with connect(address) as sock:
        kind = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""])
        sock.sendall(head("POST", PATHS[0], len(body), "Connection: close\r\n", kind) + body)
        return read_answer(sock)[0]


def over_limit(rng: random.Random, address: tuple[str, int], limit: int) -> int | None:
    """A body declared over the limit: the answer comes without the body being sent."""
    with connect(address) as sock:
        sock.sendall(head("POST", rng.choice(PATHS), limit + 1 + rng.randrange(1 << 30)))
        return read_answer(sock)[0]


def over_limit_chunked(rng: random.Random, address: tuple[str, int], limit: int) -> int | None:
    """A chunked body that grows past the limit: answered at the limit."""
    with connect(address) as sock:
        sock.sendall(head("POST", rng.choice(PATHS), None, "Transfer-Encoding: chunked\r\n"))
        piece = b"x" * 65536
        sent = 0
        try:
            while sent <= limit:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        except (TimeoutError, ConnectionError):
            pass
        return read_answer(sock)[0]


def gone_mid_headers(rng: random.Random, address: tuple[str, int], limit: int) -> int | None:
    with connect(address) as sock:
        whole = head("POST", rng.choice(PATHS), 100)
        sock.sendall(whole[: rng.randrange(1, len(whole) - 2)])
    return None


def gone_mid_body(rng: random.Random, address: tuple[str, int], limit: int) -> int | None:
    body = json.dumps({"prompt": "x" * 500, "max_tokens": 1}).encode()
    with connect(address) as sock:
        sock.sendall(head("POST", PATHS[1], len(body)) + body[: rng.randrange(0, len(body) - 1)])
        time.sleep(rng.choice([0, 0.01, 0.05]))
    return None


def gone_after_dispatch(rng: random.Random, address: tuple[str, int], limit: int) -> int | None:
    """A streamed request, dropped once its status line is in (the request is cancelled)."""
    body = json.dumps({"prompt": "x", "max_tokens": 50, "stream": rng.random() < 0.7}).encode()
    with connect(address) as sock:
        sock.sendall(head("POST", PATHS[1], len(body)) + body)
        sock.settimeout(IO_TIMEOUT_S)
        try:
            first = sock.recv(64)
        except (TimeoutError, ConnectionError):
            return None
        if rng.random() < 0.5:  # reset, not a clean close
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        return int(first.split()[1]) if first.startswith(b"HTTP/1.1 ") else None


ABUSES: dict[str, Abuse] = {
    "malformed_body": malformed_body,
    "garbage_request_line": garbage_request_line,
    "odd_method_or_path": odd_method_or_path,
    "wrong_content_type": wrong_content_type,
    "over_limit": over_limit,
    "over_limit_chunked": over_limit_chunked,
    "gone_mid_headers": gone_mid_headers,
    "gone_mid_body": gone_mid_body,
    "gone_after_dispatch": gone_after_dispatch,
}
WEIGHTS = {"malformed_body": 6, "over_limit_chunked": 1}


def abuse_once(rng: random.Random, address: tuple[str, int], limit: int) -> tuple[str, int | None]:
    names = [name for name in ABUSES for _ in range(WEIGHTS.get(name, 2))]
    name = rng.choice(names)
    try:
        return name, ABUSES[name](rng, address, limit)
    except (TimeoutError, ConnectionError):
        return name, None


def log_complaints(log_text: str) -> list[str]:
    """Daemon log lines holding a traceback or above warning (JSON lines; a line that is not JSON counts too)."""
    bad = []
    for line in log_text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if "Traceback" in line or "exception" in record or record.get("level") in ("error", "critical"):
            bad.append(line)
    return bad
