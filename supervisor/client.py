"""The Python client.  Imports pyzmq and the wire protocol only.

    from supervisor.client import Client
    with Client("ipc:///path/to/run/client.sock") as client:
        for event in client.generate(prompt="Hello", max_tokens=32):
            if event["event"] == "token":
                print(event["text"], end="", flush=True)

One client holds one DEALER socket; replies are matched to requests by id,
so a stream can be cancelled from the same client while it is being read.
A client is not thread-safe: use one per thread.  Several requests may be
outstanding on one client: ``send`` each, then take their events as they come
with ``receive_any`` (each event names its request in ``id``).

A tcp endpoint takes CURVE: pass ``curve=CurveKeys.from_files(server.key,
NAME.key_secret)`` (docs/CONFIG.md, Security).
"""

from __future__ import annotations

import os
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Iterator

import zmq
from zmq.auth import load_certificate
from zmq.utils.monitor import recv_monitor_message

from workers import protocol as p

_HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class ClientTimeout(TimeoutError):
    """The daemon did not answer in time (is it running? is the endpoint right?)."""


class ClientRefused(ClientTimeout):
    """No answer because the daemon refused the connection's CURVE handshake."""


@dataclass(frozen=True)
class CurveKeys:
    """What a client presents on a tcp endpoint: the daemon's public key and its own pair (Z85 text)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(
        cls, server_key_file: str | os.PathLike[str], client_key_file: str | os.PathLike[str]
    ) -> "CurveKeys":
        """From ZeroMQ certificate files: the daemon's ``server.key`` and a client's ``NAME.key_secret``."""
        server_public, _ = load_certificate(server_key_file)
        public, secret = load_certificate(client_key_file)
        if secret is None:
            raise ValueError(f"{client_key_file} holds no secret key")
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the daemon (before it connects)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


class Client:
    def __init__(
        self,
        endpoint: str,
        timeout_s: float | None = 60.0,
        context: zmq.Context | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        """``timeout_s`` bounds each wait for the next event, not a whole generation."""
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._monitor: zmq.Socket | None = None
        if curve is not None:
            curve.apply(self._socket)
            # A refused handshake is silent on the socket itself: the monitor tells a refusal from a daemon that is not there.
            self._monitor = self._socket.get_monitor_socket(_HANDSHAKE_FAILURES)
        self._socket.connect(endpoint)
        self._pending: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self._receive_timeout_ms = -1  # RCVTIMEO as last set (-1: wait forever, zmq's default)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._monitor is not None and not self._socket.closed:
            self._socket.disable_monitor()
            self._monitor.close(0)
        self._socket.close(0)
        if self._own_context:
            self._context.term()

    # --- ops -----------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> str:
        """Send one raw message (an ``id`` is added if missing); return its id."""
        message = dict(message)
        message.setdefault("id", uuid.uuid4().hex[:16])
        self._socket.send(p.encode(message))
        return message["id"]

    def send_raw(self, frame: bytes) -> None:
        """Send bytes as they are: for tests of the daemon's handling of bad input."""
        self._socket.send(frame)

    def generate(
        self, prompt: str | None = None, messages: list[dict[str, str]] | None = None, **fields: Any
    ) -> Iterator[dict[str, Any]]:
        """Yield the request's events: tokens, then exactly one ``done`` or ``error``.

        The request id is the ``id`` of every event; ``fields`` are the
        protocol's generate fields (max_tokens, temperature, stream, ...).
        """
        message: dict[str, Any] = {"op": p.OP_GENERATE, **fields}
        if prompt is not None:
            message["prompt"] = prompt
        if messages is not None:
            message["messages"] = messages
        request_id = self.send(message)
        return self.events(request_id)

    def complete(
        self, prompt: str | None = None, messages: list[dict[str, str]] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Run a request to its end; return the terminal event (``done`` has ``text``)."""
        fields.setdefault("stream", False)
        text: list[str] = []
        for event in self.generate(prompt, messages, **fields):
            if event["event"] == p.EVENT_TOKEN:
                text.append(event["text"])
            else:
                if event["event"] == p.EVENT_DONE and "text" not in event:
                    event["text"] = "".join(text)
                return event
        raise AssertionError("unreachable: events() always ends with a terminal event")

    def embed(self, input: str | list[str] | list[list[int]], **fields: Any) -> dict[str, Any]:
        """Run an embed op to its end; return its terminal event: ``embeddings`` (``embeddings``: one vector
        per input, in order; ``usage``) or ``error``.  ``fields``: engine, deadline_ms, keep_alive."""
        return self.receive(self.send({"op": p.OP_EMBED, "input": input, **fields}))

    def events(self, request_id: str) -> Iterator[dict[str, Any]]:
        while True:
            event = self.receive(request_id)
            yield event
            if event["event"] in p.TERMINAL_EVENTS:
                return

    def cancel(self, request_id: str) -> dict[str, Any]:
        return self.receive(self.send({"op": p.OP_CANCEL, "target": request_id}))

    def status(self) -> dict[str, Any]:
        return self.receive(self.send({"op": p.OP_STATUS}))

    def reload(self) -> dict[str, Any]:
        """The daemon reads its configuration again: a "reloaded" event, or an "error" (invalid_config)."""
        return self.receive(self.send({"op": p.OP_RELOAD}))

    def load(self, engine: str, keep_alive: float | str | None = None) -> dict[str, Any]:
        """Load an engine's model now: a "load_ack" event (state loading or ready), or an "error"."""
        fields = {} if keep_alive is None else {"keep_alive": keep_alive}
        return self.receive(self.send({"op": p.OP_LOAD, "engine": engine, **fields}))

    def unload(self, engine: str | None = None) -> dict[str, Any]:
        """Unload an engine's model (None: every loaded one) once its requests have finished."""
        return self.receive(self.send({"op": p.OP_UNLOAD, **({"engine": engine} if engine else {"all": True})}))

    def ps(self) -> dict[str, Any]:
        """Every model: available, loaded, where and how much memory; unavailable files with the reason."""
        return self.receive(self.send({"op": p.OP_PS}))

    def ping(self) -> dict[str, Any]:
        return self.receive(self.send({"op": p.OP_PING}))

    def buffered(self, request_id: str) -> int:
        """Events received for ``request_id`` and not read yet."""
        return len(self._pending.get(request_id, ()))

    # --- receiving -----------------------------------------------------------

    def receive(self, request_id: str | None, timeout_s: float | None = ...) -> dict[str, Any]:  # type: ignore[assignment]
        """The next event for ``request_id`` (None: errors the daemon could not tie to an id)."""
        timeout = self.timeout_s if timeout_s is ... else timeout_s
        event = self._take_buffered(request_id)
        if event is not None:
            return event
        self._set_receive_timeout(timeout)
        while (event := self._receive_event(timeout)).get("id") != request_id:
            self._pending[event.get("id")].append(event)  # type: ignore[index]
        return event

    def receive_any(self, timeout_s: float | None = ...) -> dict[str, Any]:  # type: ignore[assignment]
        """The next event of any request (one buffered by an earlier :meth:`receive` first): for a caller
        that keeps several requests outstanding and takes their events as they come."""
        timeout = self.timeout_s if timeout_s is ... else timeout_s
        event = self._take_buffered(next(iter(self._pending))) if self._pending else None
        if event is not None:
            return event
        self._set_receive_timeout(timeout)
        return self._receive_event(timeout)

    def _take_buffered(self, request_id: str | None) -> dict[str, Any] | None:
        """The oldest event set aside for ``request_id``, if any."""
        queue = self._pending.get(request_id)
        if not queue:
            return None
        event = queue.popleft()
        if not queue:
            del self._pending[request_id]
        return event

    def _receive_event(self, timeout: float | None) -> dict[str, Any]:
        """One event off the socket, within the receive timeout already set."""
        try:
            return p.decode(self._socket.recv())
        except zmq.Again:
            raise self._no_answer(timeout) from None

    def _no_answer(self, timeout: float | None) -> ClientTimeout:
        refusal = None
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                refusal = "the daemon refused this client's key (it is not among the authorized keys)"
            elif refusal is None:
                refusal = "the CURVE handshake failed (is the server key the daemon's current one, and does the endpoint take CURVE?)"
        if refusal is not None:
            return ClientRefused(f"{self.endpoint}: {refusal}")
        return ClientTimeout(f"no answer from {self.endpoint} within {timeout}s")

    def _set_receive_timeout(self, timeout: float | None) -> None:
        milliseconds = -1 if timeout is None else max(0, int(timeout * 1000))
        if milliseconds != self._receive_timeout_ms:
            self._socket.setsockopt(zmq.RCVTIMEO, milliseconds)
            self._receive_timeout_ms = milliseconds
