"""ZeroMQ sockets on the asyncio loop, without a future per message.

Every token of every stream crosses the daemon twice (worker in, client
out), so the per-message cost is the daemon's cost.  pyzmq's asyncio layer
allocates a future and takes an event-loop turn for every receive and send;
here a socket is read by a plain callback that, each time the socket's file
descriptor wakes the loop, reads every message waiting, and sends are plain
non-blocking sends.

libzmq signals readiness through its file descriptor edge-wise: an operation
on the socket (a send included) can take in pending messages without the
descriptor firing again.  So after every send, and after every drain, the
socket's EVENTS are checked and a drain is scheduled if messages wait.
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable

import zmq
import zmq.asyncio

FramesHandler = Callable[[list[bytes]], None]


class SocketReader:
    """Calls ``handle(frames)`` for every message arriving on ``sock``, in order."""

    def __init__(self, sock: zmq.Socket, handle: FramesHandler) -> None:
        self.sock = sock
        self.handle = handle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False
        self._fallback: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        try:
            loop.add_reader(self.sock.getsockopt(zmq.FD), self._drain)
        except NotImplementedError:
            # Windows' proactor loop has no add_reader: wait through pyzmq's
            # asyncio layer (its selector thread), then drain the same way.
            self._fallback = loop.create_task(self._wait_and_drain())
        self.drain_soon()  # messages that arrived before the reader was attached

    def stop(self) -> None:
        if self._fallback is not None:
            self._fallback.cancel()
        elif self._loop is not None:
            self._loop.remove_reader(self.sock.getsockopt(zmq.FD))
        self._loop = None

    def drain_soon(self) -> None:
        """Schedule a drain if messages are waiting that the descriptor will not announce."""
        if self._loop is None or self._drain_scheduled or not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return
        self._drain_scheduled = True
        self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        sock, handle = self.sock, self.handle
        try:
            # EVENTS first: a receive that finds nothing raises, and an exception per wake-up costs more than the check.
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                handle(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.ZMQError:  # closed during shutdown
            return

    async def _wait_and_drain(self) -> None:
        waiter = zmq.asyncio.Socket.from_socket(self.sock)
        while True:
            await waiter.poll(flags=zmq.POLLIN)
            self._drain()


def send_now(sock: zmq.Socket, frames: list[bytes], reader: SocketReader | None) -> zmq.ZMQError | None:
    """Send without blocking; return the refusal (peer unknown, or its queue full) instead of raising."""
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK)
        error = None
    except zmq.ZMQError as exc:
        error = exc
    if reader is not None:
        reader.drain_soon()
    return error


class BindError(Exception):
    """An endpoint could not be bound; the message names it and says why."""


def bind_socket(
    context: zmq.Context, kind: int, endpoint: str, options: dict[int, int | bytes], group: int | None = None
) -> zmq.Socket:
    """A socket with ``options`` set, then bound; an ipc socket file gets mode 0660 (and ``group``).

    Options must come first: libzmq copies them into the listener at bind
    time, and connections accepted later get the listener's copy (a
    MAXMSGSIZE or SNDHWM set after bind never reaches a client's pipe, and
    CURVE_SERVER set after bind is never asked for).
    """
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 1000)
    for option, value in options.items():
        sock.setsockopt(option, value)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise BindError(f"cannot bind {endpoint}: {exc}") from None
    # ipc://@name is Linux's abstract namespace: no file, no permissions.
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        try:
            _restrict_socket_file(endpoint[len("ipc://") :], group)
        except OSError as exc:
            sock.close(0)
            raise BindError(f"cannot set the permissions of {endpoint}: {exc.strerror or exc}") from None
    return sock


def _restrict_socket_file(path: str, group: int | None) -> None:
    """Only the daemon's user and its group (``group``, or the user's own) may connect."""
    os.chmod(path, 0o660)
    if group is not None:
        os.chown(path, -1, group)
