"""The HTTP front: OpenAI's completions API, served on the daemon's own event loop.

A Starlette app under uvicorn, started and stopped by the daemon (which
keeps the signals: uvicorn's own handlers are off).  Every completion is a
client of the client front (exchange.py), so it meets the router the
way a ZeroMQ client does.  docs/HTTP.md is the reference.

``build_app`` takes extra routes, so another endpoint (metrics, say) is one
more ``Route`` handed to :class:`HttpFront`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from workers import protocol as p
from workers.protocol import ErrorCode

from ...config import EngineConfig, HttpConfig, split_listen
from ...logs import get_logger
from ..client_front import ClientFront, LocalEnvelope
from ..memory import trim_soon
from .access import bearer_allowed
from .door import Door, DoorCollector, DoorLimits, DoorSocket, descriptor_budget
from .answers import Answer
from .embeddings import answer as embeddings_answer
from .embeddings import parse_embeddings, run_embed
from .exchange import ClientGone, Exchange, GenerationAnswer, json_body
from ..transport import BindError
from .model_routes import model_routes, statuses
from .ollama_routes import ollama_routes
from .openai import (
    CHAT,
    COMPLETIONS,
    ApiError,
    bad_request,
    choice_ops,
    engine_for_choices,
    model_names,
    parse_request,
    resolve_model,
    unknown_model,
)

log = get_logger("supervisor.http")

OWNER = "node-supervisor"
STOP_MARGIN_S = 2.0  # beyond the daemon's own grace, for answers to reach their clients


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is over {limit} bytes (max_message_bytes)", ErrorCode.TOO_LARGE)


def error_response(error: ApiError) -> Response:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    if error.status == 413:
        headers = {"connection": "close"}  # the rest of the body is never taken in
    return Response(json_body(error.body()), error.status, headers, media_type="application/json")


def json_response(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(json_body(payload), status, media_type="application/json")


class OpenAIRoutes:
    """The endpoints: completions, chat completions, models, liveness and readiness."""

    def __init__(
        self,
        front: ClientFront,
        engines: Callable[[], dict[str, EngineConfig]],
        keys: frozenset[bytes],
        max_tokens_limit: int,
        max_body_bytes: int,
    ) -> None:
        self.front, self.engines, self.keys = front, engines, keys
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.created = int(time.time())
        self._routing_secret = os.urandom(8).hex().encode()  # no ZeroMQ peer can name an HTTP request's envelope
        self._count = itertools.count(1)
        self.gone_before_dispatch = 0  # clients that left before their request was read whole (metrics)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            *model_routes(self),
            *ollama_routes(self),
        ]

    def _routing_id(self) -> bytes:
        return b"\x00http:%s:%d" % (self._routing_secret, next(self._count))

    def _authorized(self, request: Request) -> bool:
        return bearer_allowed(request.headers.get("authorization"), self.keys)

    async def chat(self, request: Request) -> Any:
        return await self._complete(request, CHAT)

    async def completions(self, request: Request) -> Any:
        return await self._complete(request, COMPLETIONS)

    async def _complete(self, request: Request, kind: str) -> Any:
        try:
            self._check_key(request)
            body = await self._read_body(request)
            parsed = parse_request(kind, body, self.engines(), self.max_tokens_limit)
            if parsed.n > 1:
                status = self._ask({"op": p.OP_STATUS, "id": "choices"})
                parsed.message["engine"] = engine_for_choices(
                    parsed.n, parsed.message.get("engine"), status, self.engines()
                )
        except ApiError as error:
            return error_response(error)
        except ClientGone:
            return self.client_gone(request)
        request_id = f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{secrets.token_hex(12)}"
        logprobs = bool(parsed.message.get("logprobs"))
        answer = Answer(kind, request_id, parsed.model, int(time.time()), parsed.include_usage, parsed.n, logprobs)
        exchange = Exchange(self.front, self._routing_id(), answer.op_ids)
        for op in choice_ops(parsed.message, answer.op_ids):
            exchange.send(op)  # a refusal is among its events already
        return GenerationAnswer(exchange, answer, parsed.stream, parsed.renamed)

    def client_gone(self, request: Request) -> Response:
        """The answer to a client that left before its request was read whole (counted for the metrics)."""
        self.gone_before_dispatch += 1
        log.debug("http client gone before its request was read", client=request.client and request.client.host)
        return Response(status_code=499)  # never written: uvicorn drops what is sent to a closed connection

    async def embeddings(self, request: Request) -> Any:
        try:
            self._check_key(request)
            parsed = parse_embeddings(await self._read_body(request), self.engines())
        except ApiError as error:
            return error_response(error)
        except ClientGone:
            return self.client_gone(request)
        try:
            return json_response(embeddings_answer(parsed, await self.run_embed(parsed.message, request.receive)))
        except ApiError as error:
            return error_response(error)
        except ClientGone:
            return Response(status_code=499)  # never written: the client has gone, its embed is cancelled

    async def run_embed(self, message: dict[str, Any], receive: Any = None) -> dict[str, Any]:
        """An embed op (its fields: input, engine, ...) run through the client front; its terminal event,
        ``embeddings`` or ``error`` (embeddings.run_embed); ClientGone when the client disconnects first
        (``receive``: its request's).  What Ollama's /api/embed calls."""
        return await run_embed(self.front, self._routing_id(), f"embd-{secrets.token_hex(12)}", message, receive)

    def metrics_route(self, render: Callable[[str | None], tuple[bytes, str]]) -> Route:
        """GET /metrics: the Prometheus exposition (io/metrics.py), behind the API keys when there are any
        (it names engines, models and spend)."""

        async def metrics(request: Request) -> Response:
            try:
                self._check_key(request)
            except ApiError as error:
                return error_response(error)
            body, content_type = render(request.headers.get("accept"))
            return Response(body, media_type=content_type)

        return Route("/metrics", metrics, methods=["GET"])

    def _check_key(self, request: Request) -> None:
        if not self._authorized(request):
            raise ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <key>", "invalid_api_key")

    async def _read_body(self, request: Request) -> dict[str, Any]:
        """The JSON object of the body, up to the daemon's message size limit.

        A body declared larger than the limit is refused (413) before any of it is
        read; one that grows past it (chunked) is refused at the limit, read no
        further.  Either way the answer closes the connection: what the client still
        sends is dropped unread (door.py's lingering close), never held.
        """
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone() from None
        trim_soon(size)
        try:
            return p.decode(b"".join(chunks))
        except p.DecodeError as exc:
            raise bad_request(None, f"the body must be a JSON object: {exc}", ErrorCode.MALFORMED) from None

    async def models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except ApiError as error:
            return error_response(error)
        engines, loaded = self.engines(), statuses(self)
        status = self._ask({"op": p.OP_STATUS, "id": "models"})
        # An engine that takes no traffic now is listed, marked unavailable: a client (or another node's
        # remote engine) sees it exists and that asking it now would be refused, as llama-server's router marks.
        for engine in status.get("engines", ()):
            if not engine.get("available"):
                loaded[engine["name"]] = "unavailable"
        return json_response(
            {"object": "list", "data": [self._model(n, engines, loaded) for n in model_names(engines)]}
        )

    async def model(self, request: Request) -> Response:
        name, engines = request.path_params["model"], self.engines()
        try:
            self._check_key(request)
            if name not in model_names(engines):
                raise unknown_model(name, engines)
        except ApiError as error:
            return error_response(error)
        return json_response(self._model(name, engines, statuses(self)))

    def _model(self, name: str, engines: dict[str, EngineConfig], loaded: dict[str, str]) -> dict[str, Any]:
        """One model entry: an engine, or an alias (``root`` names the engine either way); ``status``:
        whether it is loaded now (llama-server's router field), or ``unavailable`` (it takes no traffic now)."""
        root = resolve_model(name, engines) or name
        entry = {"id": name, "object": "model", "created": self.created, "owned_by": OWNER, "root": root}
        return {**entry, "status": {"value": loaded.get(root, "unloaded")}}

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """200 when an engine's worker is ready to generate now; 503 with each engine's state otherwise."""
        status = self._ask({"op": p.OP_STATUS, "id": "readyz"})
        if status.get("event") != p.EVENT_STATUS:
            return json_response({"ready": False, "reason": status.get("message")}, 503)
        detail = self._authorized(request)  # reasons may name paths: only for those who hold a key
        engines = [
            {"name": e["name"], "state": e["state"], **({"reason": e["reason"]} if detail else {})}
            for e in status["engines"]
        ]
        stopping = status["daemon"]["stopping"]
        ready = not stopping and any(e["state"] == "ready" for e in engines)
        body: dict[str, Any] = {"ready": ready, "engines": engines}
        if stopping:
            body["reason"] = "the daemon is stopping"
        return json_response(body, 200 if ready else 503)

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """An op answered at once (status), through the client front like any client's."""
        replies: list[bytes] = []

        def deliver(frame: bytes) -> bool:
            replies.append(frame)
            return True

        self.front.on_message(LocalEnvelope(self._routing_id(), deliver), p.encode(message))
        return p.decode(replies[0]) if replies else {"event": p.EVENT_ERROR, "message": "no answer"}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path, wrong method) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    return error_response(ApiError(exc.status_code, str(exc.detail), None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(500, "internal error; see the daemon log", ErrorCode.INTERNAL))


def build_app(routes: Sequence[BaseRoute]) -> Starlette:
    return Starlette(routes=list(routes), exception_handlers={HTTPException: _http_error, Exception: _internal_error})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the daemon owns SIGTERM, SIGINT and SIGHUP, and stops this server itself


def bind_listener(listen: str) -> DoorSocket:
    """The listening socket, bound before the loop runs, so a taken port fails start-up with one line."""
    host, port = split_listen(listen)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = DoorSocket(family, kind, proto)
    except OSError as exc:
        raise BindError(f"http.listen: cannot bind {listen}: {exc.strerror or exc}") from None
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"http.listen: cannot bind {listen}: {exc.strerror or exc}") from None
    return sock


class HttpFront:
    """The server's life: bound at construction, served by :meth:`start`, stopped in the daemon's shutdown."""

    def __init__(
        self, config: HttpConfig, routes: OpenAIRoutes, grace_s: float, extra_routes: Sequence[BaseRoute] = ()
    ) -> None:
        assert config.listen is not None
        self.sock = bind_listener(config.listen)
        host, port = self.sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.keys_required = bool(routes.keys)
        self.routes = routes
        self.app = build_app([*routes.routes(), *extra_routes])
        budget = descriptor_budget(config.fd_reserve)
        self.door = Door(
            DoorLimits(
                config.header_timeout_s,
                config.body_timeout_s,
                config.max_connections,
                config.max_connections_per_client,
                budget,
            )
        )
        self.sock.door = self.door
        if budget is not None and budget < config.max_connections:
            log.warning(
                "the descriptor limit bounds http connections below http.max_connections",
                budget=budget,
                max_connections=config.max_connections,
                fd_reserve=config.fd_reserve,
                hint="raise LimitNOFILE (ulimit -n) or lower http.max_connections",
            )
        self.server = _Server(
            uvicorn.Config(
                self.app,
                http=self.door.protocol(),
                timeout_keep_alive=config.keep_alive_timeout_s,  # type: ignore[arg-type]
                ws="none",
                lifespan="off",
                log_config=None,
                access_log=False,
                proxy_headers=False,
                server_header=False,
                timeout_graceful_shutdown=int(grace_s + STOP_MARGIN_S) + 1,
            )
        )
        self._task: asyncio.Task[None] | None = None
        # Its info lines speak of its own command line ("CTRL+C to force quit"); errors and warnings still reach the log.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

    def collector(self) -> DoorCollector:
        return DoorCollector(self.door, lambda: self.routes.gone_before_dispatch)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        self._task.add_done_callback(self._ended)
        log.info("http serving", address=self.address, api_keys=self.keys_required)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the http front stopped", error=repr(task.exception()))

    def stop_accepting(self) -> None:
        """No new connections; answers in progress go on (the daemon's shutdown ends their requests)."""
        self.server.should_exit = True

    async def stopped(self, timeout_s: float = STOP_MARGIN_S) -> None:
        """Wait for the server to finish its answers and close; then stop it harder."""
        self.server.should_exit = True
        if self._task is None:
            self.sock.close()
            return
        done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
        if not done:
            log.warning("http answers still open at shutdown; closing them")
            self.server.force_exit = True
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)
