"""``GET /metrics`` on a loopback port of its own (``[metrics] listen``), for nodes
that run no HTTP front.

A deliberately small HTTP/1.1 responder on the daemon's event loop: one
request per connection, a bounded head, a time limit, the answer closes the
connection.  Serving from the loop means a scrape reads the core's state on
the thread that writes it.  Nothing a peer sends raises past here: bad input
gets 400, 404 or 405; a bug gets 500 and a log line.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from ..logs import get_logger
from .metrics import MetricsExporter
from .transport import BindError

log = get_logger("supervisor.metrics")

PATH = "/metrics"
HEAD_LIMIT_BYTES = 16 << 10  # one request line or header line; a scraper sends a few short ones
MAX_HEADER_LINES = 64
REQUEST_TIMEOUT_S = 10.0


class BadRequest(Exception):
    pass


class MetricsServer:
    def __init__(self, exporter: MetricsExporter, host: str, port: int) -> None:
        self.exporter = exporter
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Listen; the URL scrapers use (with the port bound, when 0 asked for any)."""
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=HEAD_LIMIT_BYTES)
        except OSError as exc:
            raise BindError(f"cannot listen for metrics on {self.host}:{self.port}: {exc.strerror or exc}") from None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}{PATH}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                method, target, accept = await asyncio.wait_for(self._read_head(reader), REQUEST_TIMEOUT_S)
                response = self._answer(method, target, accept)
            except (
                BadRequest,
                asyncio.LimitOverrunError,
                asyncio.IncompleteReadError,
            ):  # a line over the limit, or cut short
                response = _response(HTTPStatus.BAD_REQUEST, b"bad request\n")
            writer.write(response)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError):
            pass  # the scraper went away or never finished asking
        except Exception:
            log.exception("internal error answering a metrics request")
        finally:
            writer.close()

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, str]:
        """(method, target, Accept header) of the request; its body, if any, is never read."""
        parts = (await reader.readuntil(b"\n")).decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise BadRequest()
        accept = ""
        for _ in range(MAX_HEADER_LINES):
            line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
            if not line:
                return parts[0], parts[1], accept
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        raise BadRequest()

    def _answer(self, method: str, target: str, accept: str) -> bytes:
        if target.split("?", 1)[0] != PATH:
            return _response(HTTPStatus.NOT_FOUND, f"not found; the metrics are at {PATH}\n".encode())
        if method not in ("GET", "HEAD"):
            return _response(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
        try:
            body, content_type = self.exporter.render(accept)
        except Exception:
            log.exception("internal error rendering the metrics")
            return _response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error; see the daemon log\n")
        return _response(HTTPStatus.OK, body, content_type, with_body=method == "GET")


def _response(
    status: HTTPStatus,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    extra: bytes = b"",
    with_body: bool = True,
) -> bytes:
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n"
    ).encode("latin-1")
    return head + extra + b"\r\n" + (body if with_body else b"")
