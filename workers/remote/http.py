"""HTTP to an OpenAI-compatible upstream, standard library only: one kept-alive
connection, the server-sent event stream read line by line, and what each
refusal means for the engine (workers/remote/engine.py).

The API key is sent as ``Authorization: Bearer`` and never written anywhere
else: every text taken from the upstream (an error body may echo what it was
sent) has the key masked before it becomes a message.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import time
from email.utils import parsedate_to_datetime
from typing import Any, Iterator
from urllib.parse import urlsplit

from ..engine import EngineFailed, ModelError, RequestError
from ..protocol import ErrorCode

DONE = object()  # the stream's `data: [DONE]`
ERROR_BODY_BYTES = 4096  # of a refusal's body, enough for its message
MAX_RETRY_AFTER_S = 3600.0
_CONTEXT = re.compile(r"context (length|size|window)|maximum context", re.IGNORECASE)
# Statuses after which the same request may well succeed later: the upstream is
# overloaded, rate-limiting or broken, which is the engine's failure, not the request's.
TRANSIENT = frozenset({408, 425, 429})
# How a kept-alive connection the server closed while it was idle fails: the request never reached it.
STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class Unreachable(OSError):
    """No connection to the upstream could be made."""


class Upstream:
    """One upstream server: its address, its key, its timeouts, a connection kept between requests."""

    def __init__(self, base_url: str, api_key: str | None, connect_timeout_s: float, read_timeout_s: float) -> None:
        parts = urlsplit(base_url)
        self.base_url = base_url
        self.secure = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.secure else 80)
        self.prefix = parts.path.rstrip("/")
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self._key = api_key
        self._connection: http.client.HTTPConnection | None = None

    def redact(self, text: str) -> str:
        """``text`` with the API key masked wherever it appears."""
        return text.replace(self._key, "***") if self._key else text

    def send(self, method: str, path: str, body: dict[str, Any] | None = None) -> http.client.HTTPResponse:
        """Send one request; its response once the status line and headers are in.

        A kept-alive connection the server has closed meanwhile fails before
        any answer: the request is sent again once on a new connection.
        EngineFailed when the upstream cannot be reached or does not answer.
        """
        payload = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Accept": "application/json, text/event-stream", "User-Agent": "node-supervisor"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        while True:  # twice at most: the second time on a new connection
            reused = self._connection is not None
            try:
                return self._exchange(method, path, payload, headers)
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if not (reused and isinstance(exc, STALE_CONNECTION)):
                    raise EngineFailed(
                        f"{method} {self.base_url}{path}: {describe(exc, self.read_timeout_s)}"
                    ) from None

    def _exchange(
        self, method: str, path: str, payload: bytes | None, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        if self._connection is None:
            if self.secure:
                connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.connect_timeout_s, context=ssl.create_default_context()
                )
            else:
                connection = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout_s)
            try:
                connection.connect()
            except OSError as exc:  # refused, no route, no answer, TLS: the upstream is unreachable
                reason = (
                    f"no connection within {self.connect_timeout_s:g} s"
                    if isinstance(exc, TimeoutError)
                    else describe(exc, 0)
                )
                raise Unreachable(f"cannot connect to {self.host}:{self.port}: {reason}") from None
            assert connection.sock is not None
            connection.sock.settimeout(self.read_timeout_s)  # from now on: the longest wait for the next bytes
            self._connection = connection
        self._connection.request(method, self.prefix + path, body=payload, headers=headers)
        return self._connection.getresponse()

    def close(self) -> None:
        """Drop the connection: the upstream sees a stream it was sending end (a cancel)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def finished(self, response: http.client.HTTPResponse) -> None:
        """The answer's last event is in: read the body's end, and keep the connection for
        the next request unless the server closes it."""
        try:
            response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            return
        if response.will_close:
            self.close()

    def refusal(self, response: http.client.HTTPResponse, loading: bool) -> Exception:
        """What a status other than 200 means: the engine's failure (EngineFailed, ModelError while
        loading) or this request's (RequestError)."""
        body = _read_some(response)
        self.close()
        error = _error_object(body)
        message = self.redact(f"upstream answered {response.status} {response.reason}: {_error_text(error, body)}")
        status = response.status
        if status in TRANSIENT or status >= 500:
            return EngineFailed(message, retry_after(response.getheader("Retry-After")))
        if loading:
            return ModelError(message)  # a key refused, a wrong base_url: the circuit opens and its probe tries again
        if status in (401, 403, 404) or status < 400:
            return EngineFailed(message)  # the key or the model went away: the restart's load check says which
        if _CONTEXT.search(str(error.get("message") or "")) or error.get("code") == "context_length_exceeded":
            return RequestError(ErrorCode.CONTEXT_OVERFLOW, message)
        return RequestError(ErrorCode.INVALID_REQUEST, message)

    def expect_stream(self, response: http.client.HTTPResponse) -> None:
        """A 200 that is not an event stream (the upstream ignored ``stream``) is the engine's failure."""
        content_type = response.getheader("Content-Type") or "no content type"
        if not content_type.startswith("text/event-stream"):
            body = _read_some(response)
            self.close()
            raise EngineFailed(
                self.redact(
                    f"upstream answered {content_type}, not an event stream: {_error_text(_error_object(body), body)}"
                )
            )

    def in_band_error(self, error: Any) -> Exception:
        """An error the upstream sent as an event of the stream (after its status line said 200)."""
        error = error if isinstance(error, dict) else {"message": error}
        message = self.redact(f"upstream reported an error in its stream: {_error_text(error, b'')}")
        if error.get("code") == "context_length_exceeded" or _CONTEXT.search(str(error.get("message") or "")):
            return RequestError(ErrorCode.CONTEXT_OVERFLOW, message)
        if error.get("type") == "invalid_request_error":
            return RequestError(ErrorCode.INVALID_REQUEST, message)
        return EngineFailed(message)


def events(response: http.client.HTTPResponse) -> Iterator[Any]:
    """The ``data`` of each server-sent event as it arrives, JSON-decoded (DONE for ``[DONE]``);
    comments, other fields and keep-alive lines are skipped.  Ends at the end of the body."""
    data: list[bytes] = []
    while line := response.readline():
        line = line.rstrip(b"\r\n")
        if line:
            field, _, value = line.partition(b":")
            if field == b"data":
                data.append(value[1:] if value.startswith(b" ") else value)
            continue
        if not data:
            continue
        payload, data = b"\n".join(data), []
        if payload.strip() == b"[DONE]":
            yield DONE
            continue
        try:
            yield json.loads(payload)
        except ValueError:
            raise EngineFailed(f"upstream sent an event that is not JSON: {payload[:200]!r}") from None


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (a number of seconds, or an HTTP date), at most an hour; None if absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def describe(exc: BaseException, read_timeout_s: float) -> str:
    """A connection failure in words."""
    if isinstance(exc, Unreachable):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer within {read_timeout_s:g} s (timed out)"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection closed in the middle of the answer"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _read_some(response: http.client.HTTPResponse) -> bytes:
    try:
        return response.read(ERROR_BODY_BYTES)
    except (OSError, http.client.HTTPException):
        return b""


def _error_object(body: bytes) -> dict[str, Any]:
    """OpenAI's ``{"error": {...}}`` (or a bare ``{"message": ...}``) of a refusal's body; {} otherwise."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return {}
    if isinstance(decoded, dict):
        error = decoded.get("error", decoded)
        return error if isinstance(error, dict) else {"message": error}
    return {}


def _error_text(error: dict[str, Any], body: bytes) -> str:
    """The upstream's own words, one short line: its code and message, else the start of the body."""
    if error:
        code = error.get("code") or error.get("type")
        text = f"{code}: {error.get('message')}" if code else str(error.get("message"))
    else:
        text = body.decode("utf-8", "replace").strip() or "(no body)"
    return " ".join(text.split())[:300]
