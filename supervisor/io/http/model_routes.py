"""`POST /models/load` and `POST /models/unload` with llama-server's router-mode bodies
(``{"model": "NAME"}``, answered ``{"success": true}``), and each model's load status for
`/v1/models` (llama-server's ``status.value``: loaded, loading, unloaded, error).  Each asks
the daemon through the client front, as a ZeroMQ client would (the load, unload and ps ops)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from workers import protocol as p

from .exchange import json_body
from .openai import ApiError, bad_request, error_from_event, resolve_model

# The daemon's model states as llama-server's router names them.
STATUS_VALUES = {"ready": "loaded", "spawning": "loading", "loading": "loading", "waiting": "loading"}


def load_status(state: str) -> str:
    if state in STATUS_VALUES:
        return STATUS_VALUES[state]
    return "unloaded" if state in ("stopped", "stopping") else "error"


def model_routes(routes: Any) -> list[Route]:
    """The routes, for ``routes`` (front.OpenAIRoutes: its key check, body reader, engines and ops)."""

    async def load(request: Request) -> Response:
        return await _act(routes, request, p.OP_LOAD)

    async def unload(request: Request) -> Response:
        return await _act(routes, request, p.OP_UNLOAD)

    return [Route("/models/load", load, methods=["POST"]), Route("/models/unload", unload, methods=["POST"])]


async def _act(routes: Any, request: Request, op: str) -> Response:
    try:
        routes._check_key(request)
        body = await routes._read_body(request)
        unknown = sorted(set(body) - {"model", "keep_alive"} if op == p.OP_LOAD else set(body) - {"model"})
        if unknown:
            raise bad_request(ascii(unknown[0])[1:-1], "unrecognized request argument")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise bad_request("model", "must be the name of a model")
        engine = resolve_model(body["model"], routes.engines()) or body["model"]
        message: dict[str, Any] = {"op": op, "id": f"http-{op}", "engine": engine}
        if op == p.OP_LOAD and body.get("keep_alive") is not None:
            message["keep_alive"] = body["keep_alive"]
        reply = routes._ask(message)
        if reply.get("event") == p.EVENT_ERROR:
            raise error_from_event(reply, {"engine": "model"})
    except ApiError as error:
        headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
        return Response(json_body(error.body()), error.status, headers, media_type="application/json")
    answer = {"success": True, **({"state": reply["state"]} if "state" in reply else {})}
    return Response(json_body(answer), 200, media_type="application/json")


def statuses(routes: Any) -> dict[str, str]:
    """Each engine's load status now (the ps op)."""
    reply = routes._ask({"op": p.OP_PS, "id": "http-ps"})
    return {m["engine"]: load_status(m["state"]) for m in reply.get("models", [])}
