"""Ollama's endpoints on the HTTP front: `/api/chat` and `/api/generate` (NDJSON streams by default), `/api/embed`
and `/api/embeddings` (the embed op, as /v1/embeddings runs it), `/api/tags`,
`/api/ps`, `/api/show`, `/api/version`, and `GET /` ("Ollama is running").  Each is a client of the client
front, as the OpenAI routes are: a generation is an :class:`Exchange` answered by
:class:`GenerationAnswer` (Ollama's lines written by ollama_answers.py); the listings ask the ps op; a load
or unload (an empty prompt, keep_alive 0 to unload) is the load or unload op.  docs/HTTP.md, Ollama's API.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from workers import protocol as p
from workers.protocol import ErrorCode

from ... import __version__
from .exchange import ClientGone, Exchange, GenerationAnswer, json_body
from .model_routes import load_status
from .ollama import CHAT, GENERATE, RENAMED, error_body, parse_embed, parse_request, resolve, unknown_model
from .ollama_answers import FOREVER, OllamaAnswer, details, digest, embed_answer, model_info, timestamp
from .openai import ApiError, bad_request, error_from_event, model_names, resolve_model

OLLAMA_API_VERSION = "0.5.0"  # the Ollama release whose API this front follows (format as a JSON schema)
LOAD_POLL_S = 0.1
LOAD_WAIT_S = 900.0  # a load answer waits this long at most for the model (its worker's load_timeout_s bounds it)
LOADING = ("spawning", "loading", "waiting", "stopping")  # on the way to ready (stopping: an unload, then the load)
LISTED_IN_PS = ("ready", "spawning", "loading")


def ollama_error(error: ApiError) -> Response:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    return Response(json_body(error_body(error)), error.status, headers, media_type="application/json")


def ollama_routes(routes: Any) -> list[BaseRoute]:
    """The routes, for ``routes`` (front.OpenAIRoutes: its key check, body reader, engines and ops)."""
    api = OllamaRoutes(routes)
    return [
        Route("/api/chat", api.chat, methods=["POST"]),
        Route("/api/generate", api.generate, methods=["POST"]),
        Route("/api/embed", api.embed, methods=["POST"]),
        Route("/api/embeddings", api.embeddings, methods=["POST"]),
        Route("/api/tags", api.tags, methods=["GET"]),
        Route("/api/ps", api.ps, methods=["GET"]),
        Route("/api/show", api.show, methods=["POST"]),
        Route("/api/version", api.version, methods=["GET"]),
        Route("/", api.root, methods=["GET"]),  # and HEAD
        # Last: Ollama's other endpoints (pull, push, create, copy, delete, blobs) answered in its shape.
        Route("/api/{rest:path}", api.not_served, methods=["GET", "POST", "PUT", "DELETE", "HEAD"]),
    ]


class OllamaRoutes:
    def __init__(self, routes: Any) -> None:
        self.routes = routes

    async def chat(self, request: Request) -> Any:
        return await self._generate(request, CHAT)

    async def generate(self, request: Request) -> Any:
        return await self._generate(request, GENERATE)

    async def embed(self, request: Request) -> Any:
        return await self._embed(request, legacy=False)

    async def embeddings(self, request: Request) -> Any:
        """The older endpoint: one ``prompt``, one ``embedding``."""
        return await self._embed(request, legacy=True)

    async def _embed(self, request: Request, legacy: bool) -> Any:
        """An embed op through the same path as /v1/embeddings (front.OpenAIRoutes.run_embed)."""
        routes = self.routes
        try:
            routes._check_key(request)
            parsed = parse_embed(await routes._read_body(request), routes.engines(), legacy)
        except ApiError as error:
            return ollama_error(error)
        except ClientGone:
            return routes.client_gone(request)
        try:
            event = await routes.run_embed(parsed.message, request.receive)
            return Response(
                json_body(embed_answer(parsed.model, event, legacy, parsed.dimensions)),
                200,
                media_type="application/json",
            )
        except ApiError as error:
            return ollama_error(error)
        except ClientGone:
            return Response(status_code=499)  # never written: the client has gone, its embed is cancelled

    async def _generate(self, request: Request, kind: str) -> Any:
        routes = self.routes
        try:
            routes._check_key(request)
            body = await routes._read_body(request)
            parsed = parse_request(kind, body, routes.engines(), routes.max_tokens_limit)
            if parsed.residency_only:
                return await self._residency(parsed, kind)
        except ApiError as error:
            return ollama_error(error)
        except ClientGone:
            return routes.client_gone(request)
        request_id = f"ollama-{secrets.token_hex(12)}"
        exchange = Exchange(routes.front, routes._routing_id(), [request_id])
        exchange.send({**parsed.message, "id": request_id})  # a refusal is among its events already
        return GenerationAnswer(exchange, OllamaAnswer(kind, request_id, parsed.model), parsed.stream, RENAMED)

    async def _residency(self, parsed: Any, kind: str) -> Response:
        """Ollama's load (no prompt, no messages), answered once the model is loaded; its unload (the same
        with keep_alive 0), answered once the daemon has taken it (/api/ps no longer lists the model)."""
        if parsed.engine is None:
            raise bad_request("model", "name the model to load or unload")
        keep_alive = parsed.message.get("keep_alive")
        answer = OllamaAnswer(kind, "load", parsed.model)
        if keep_alive == 0:
            self._op({"op": p.OP_UNLOAD, "id": "ollama-unload", "engine": parsed.engine})
            return self._json(answer.residency("unload"), parsed.stream)
        load = {"op": p.OP_LOAD, "id": "ollama-load", "engine": parsed.engine}
        self._op(load if keep_alive is None else {**load, "keep_alive": keep_alive})
        deadline = time.monotonic() + LOAD_WAIT_S
        while True:
            model = self._model_states().get(parsed.engine)
            state = model["state"] if model else "unknown"
            if state == "ready":
                return self._json(answer.residency("load"), parsed.stream)
            if state not in LOADING or time.monotonic() > deadline:
                reason = (model or {}).get("reason") or state
                raise ApiError(503, f"model {parsed.model!r} did not load: {reason}", ErrorCode.MODEL_LOAD_FAILED)
            await asyncio.sleep(LOAD_POLL_S)

    def _op(self, message: dict[str, Any]) -> dict[str, Any]:
        reply = self.routes._ask(message)
        if reply.get("event") == p.EVENT_ERROR:
            raise error_from_event(reply, {"engine": "model"})
        return reply

    def _model_states(self) -> dict[str, dict[str, Any]]:
        reply = self.routes._ask({"op": p.OP_PS, "id": "ollama-ps"})
        return {m["engine"]: m for m in reply.get("models", [])}

    @staticmethod
    def _json(payload: dict[str, Any], stream: bool) -> Response:
        media = "application/x-ndjson" if stream else "application/json"
        return Response(json_body(payload) + b"\n", 200, media_type=media)

    def _checked(self, request: Request) -> ApiError | None:
        try:
            self.routes._check_key(request)
        except ApiError as error:
            return error
        return None

    async def tags(self, request: Request) -> Response:
        """Every engine and alias, as `ollama list` shows models; ``status`` (not Ollama's) says whether each
        is loaded, and marks one that takes no traffic now ``unavailable`` with the reason, as /v1/models does."""
        if error := self._checked(request):
            return ollama_error(error)
        engines, states = self.routes.engines(), self._model_states()
        listed = []
        for name in model_names(engines):
            root = resolve_model(name, engines) or name
            model = states.get(root)
            if model is None:
                continue  # removed by a reload just now
            status: dict[str, Any] = {"value": load_status(model["state"])}
            if not model.get("available", True):
                status = {"value": "unavailable", "reason": model.get("reason")}
            listed.append({**self._entry(name, root, model), "status": status})
        return Response(json_body({"models": listed}), media_type="application/json")

    def _entry(self, name: str, engine: str, model: dict[str, Any]) -> dict[str, Any]:
        """What /api/tags, /api/ps and /api/show say of a model, from what the daemon knows of its file."""
        model_file = model.get("file")
        return {
            "name": name,
            "model": name,
            "modified_at": timestamp(model_file["modified"] if model_file else self.routes.created),
            "size": model_file["bytes"] if model_file else 0,
            "digest": digest(model_file, engine),
            "details": details(model_file, model.get("kind", "")),
        }

    async def ps(self, request: Request) -> Response:
        """The models loaded (or loading) now, with their memory (measured) and when they unload."""
        if error := self._checked(request):
            return ollama_error(error)
        listed, now = [], time.time()
        for engine, model in self._model_states().items():
            if model["state"] not in LISTED_IN_PS:
                continue
            gpu, rss = model.get("gpu_bytes_measured") or 0, model.get("rss_bytes") or 0
            entry = self._entry(engine, engine, model)
            listed.append(
                {
                    **entry,
                    "size": gpu + rss or entry["size"],
                    "size_vram": gpu,
                    "expires_at": _expires_at(model, now),
                    "context_length": model.get("n_ctx"),
                }
            )
        return Response(json_body({"models": listed}), media_type="application/json")

    async def show(self, request: Request) -> Response:
        try:
            self.routes._check_key(request)
            body = await self.routes._read_body(request)
            name = body.get("model", body.get("name"))  # "name": Ollama's older field
            if unknown := sorted(set(body) - {"model", "name", "verbose"}):
                raise bad_request(ascii(unknown[0])[1:-1], "unrecognized request argument")
            engine = resolve(name, self.routes.engines())
            if engine is None:
                raise bad_request("model", "name a model (default names none)")
            model = self._model_states().get(engine)
            if model is None:
                raise unknown_model(name)
        except ApiError as error:
            return ollama_error(error)
        except ClientGone:
            return self.routes.client_gone(request)
        entry = self._entry(name, engine, model)
        answer = {
            "modelfile": "",
            "parameters": f"num_ctx {model['n_ctx']}" if model.get("n_ctx") else "",
            "template": "",
            "details": entry["details"],
            "model_info": model_info(model.get("file")),
            "capabilities": ["completion"],
            "modified_at": entry["modified_at"],
        }
        return Response(json_body(answer), media_type="application/json")

    async def version(self, request: Request) -> Response:
        return Response(
            json_body({"version": OLLAMA_API_VERSION, "node_supervisor": __version__}), media_type="application/json"
        )

    async def not_served(self, request: Request) -> Response:
        """An Ollama endpoint this front does not serve: 404 in Ollama's shape, saying where models come from."""
        path = ascii(request.url.path[:64])[1:-1]
        return ollama_error(
            ApiError(
                404,
                f"{path} is not served here: models are files the operator places "
                "(models_dir, node-supervisor pull), see docs/HTTP.md",
                "not_found",
            )
        )

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running (node-supervisor)")


def _expires_at(model: dict[str, Any], now: float) -> str:
    """When the model unloads if nothing uses it: its idle countdown, or keep_alive from now while it is busy."""
    keep = model.get("keep_alive_s")
    if keep is None or keep < 0:
        return FOREVER
    unload_in = model.get("unload_in_s")
    return timestamp(now + (keep if unload_in is None else unload_in))
