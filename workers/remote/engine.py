"""The remote engine (kind ``openai``): each request goes on to an
OpenAI-compatible server (vLLM, llama-server, Ollama, another node's HTTP
front, a cloud API) and its streamed answer comes back token by token.

Standard library only (workers/remote/http.py), so its environment holds the
runtime's pyzmq and nothing else.  The upstream takes the place of a model:
``load`` asks it for its models, ``generate`` streams one completion.  What a
failure means (docs/ENGINES.md):

* unreachable, timed out, 408/425/429 or 5xx, a stream that ends without
  ``[DONE]``, an error event in the stream: EngineFailed, handled as a crash
  (the request retried or ended ``engine_failed`` with its tokens, a restart
  after backoff, the circuit breaker counting);
* while loading, a key refused (401/403) or a model the upstream does not
  list: ModelError (the circuit opens at once; its probe loads again later);
* any other 4xx: that request's error (``invalid_request``, ``context_overflow``);
* the key's environment variable unset: EngineUnavailable (the daemon's
  environment does not change while it runs).
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import ssl
from typing import Any

from ..engine import (
    EmitFn,
    EngineFailed,
    EngineUnavailable,
    GenerateResult,
    ModelError,
    ProgressFn,
    StopFn,
)
from ..protocol.messages import CAP_LOGIT_BIAS, CAP_PENALTIES, CAP_RESPONSE_FORMAT, Generate, LoadSpec, Sampling
from .http import DONE, Upstream, describe, events
from ..protocol import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP

_DEFAULT_SAMPLING = Sampling()

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
MAX_LISTED = 20  # of the upstream's models, the first this many go into status


class OpenAIRemoteEngine:
    kind = "openai"
    capabilities = (CAP_PENALTIES, CAP_LOGIT_BIAS, CAP_RESPONSE_FORMAT)  # passed on to the upstream

    def __init__(self) -> None:
        self.upstream: Upstream | None = None
        self.model = ""
        self.send_top_k = False

    def versions(self) -> dict[str, Any]:
        return {"http_client": f"python {platform.python_version()} http.client", "ssl": ssl.OPENSSL_VERSION}

    def load(self, spec: LoadSpec, progress: ProgressFn) -> dict[str, Any]:
        config = spec.upstream or {}
        if not config.get("base_url"):
            raise EngineUnavailable("no upstream configured: [engines.<name>.upstream] base_url")
        connect_s = float(config.get("connect_timeout_s") or DEFAULT_CONNECT_TIMEOUT_S)
        read_s = float(config.get("read_timeout_s") or DEFAULT_READ_TIMEOUT_S)
        self.upstream = Upstream(config["base_url"], _api_key(config.get("api_key_env")), connect_s, read_s)
        self.send_top_k = bool(config.get("send_top_k"))
        progress(0.0, f"asking {self.upstream.base_url} for its models")
        listed = self._models()
        self.model = _choose(config.get("model"), listed, self.upstream.base_url)
        progress(1.0, f"{self.model} at {self.upstream.base_url}")
        return {
            "model": self.model,
            "model_name": self.model,
            "upstream": self.upstream.base_url,
            "upstream_models": listed[:MAX_LISTED],
            "upstream_model_count": len(listed),
        }

    def _models(self) -> list[str]:
        """GET /models: the ids the upstream serves.  Its answer is the load's health check."""
        upstream = self._upstream()
        response = upstream.send("GET", "/models")
        if response.status != 200:
            raise upstream.refusal(response, loading=True)
        try:
            body = json.loads(response.read())
        except (OSError, http.client.HTTPException) as exc:
            upstream.close()
            raise EngineFailed(f"GET {upstream.base_url}/models: {describe(exc, upstream.read_timeout_s)}") from None
        except ValueError:
            upstream.close()
            raise ModelError(
                f"{upstream.base_url}/models did not answer JSON: is base_url the API root (often ending in /v1)?"
            ) from None
        upstream.finished(response)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise ModelError(
                f"{upstream.base_url}/models did not answer a model list: is base_url the API root (often ending in /v1)?"
            )
        return [str(entry["id"]) for entry in data if isinstance(entry, dict) and entry.get("id")]

    def generate(self, request: Generate, emit: EmitFn, should_stop: StopFn) -> GenerateResult:
        upstream = self._upstream()
        chat = request.messages is not None
        response = upstream.send("POST", "/chat/completions" if chat else "/completions", self._body(request))
        if response.status != 200:
            raise upstream.refusal(response, loading=False)
        upstream.expect_stream(response)
        try:
            return self._relay(response, chat, emit, should_stop)
        except (OSError, http.client.HTTPException) as exc:
            upstream.close()
            raise EngineFailed(
                f"upstream connection lost in the middle of an answer: {describe(exc, upstream.read_timeout_s)}"
            ) from None
        except BaseException:
            upstream.close()
            raise

    def _relay(
        self, response: http.client.HTTPResponse, chat: bool, emit: EmitFn, should_stop: StopFn
    ) -> GenerateResult:
        """Each text delta of the stream out as it arrives (one token each), until ``[DONE]``.

        The usage of the stream's last chunk (``include_usage``) gives the
        exact counts; an upstream that puts several tokens in one delta
        counts more than the pieces, which the protocol allows.
        """
        upstream = self._upstream()
        sent, usage, finish = 0, {}, FINISH_STOP
        for event in events(response):
            if event is DONE:
                upstream.finished(response)
                return _result(finish, usage, sent)
            if not isinstance(event, dict):
                raise EngineFailed(f"upstream sent an event that is not an object: {str(event)[:200]}")
            if event.get("error") is not None:
                raise upstream.in_band_error(event["error"])
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta") if chat else choice
                text = delta.get("content" if chat else "text") if isinstance(delta, dict) else None
                if isinstance(text, str) and text:
                    emit(text, 1)
                    sent += 1
                if choice.get("finish_reason"):
                    finish = FINISH_LENGTH if choice["finish_reason"] == "length" else FINISH_STOP
            if should_stop():
                upstream.close()  # the upstream sees its client leave, and stops generating
                return _result(FINISH_CANCELLED, usage, sent)
        raise EngineFailed(f"upstream's stream ended without [DONE] after {sent} tokens")

    def _body(self, request: Generate) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.params.max_tokens,
            "temperature": request.params.temperature,
            "top_p": request.params.top_p,
        }
        if request.messages is not None:
            body["messages"] = request.messages
        else:
            body["prompt"] = request.prompt or ""
        if request.params.stop:
            body["stop"] = list(request.params.stop)
        if request.params.seed is not None:
            body["seed"] = request.params.seed
        if self.send_top_k:
            body["top_k"] = request.params.top_k
        if request.params.ignore_eos:  # not OpenAI's: sent only when asked for (vLLM and llama-server take it)
            body["ignore_eos"] = True
        # OpenAI's penalties and bias when set; llama-server's (vLLM's, Ollama's) extensions only when not the default.
        sampling, defaults = request.params, _DEFAULT_SAMPLING
        for name in (
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "repeat_penalty",
            "min_p",
            "response_format",
        ):
            if getattr(sampling, name) != getattr(defaults, name):
                body[name] = getattr(sampling, name)
        if sampling.repeat_penalty != 1 and sampling.penalty_last_n != defaults.penalty_last_n:
            body["repeat_last_n"] = sampling.penalty_last_n  # llama-server's name
        return body

    def _upstream(self) -> Upstream:
        if self.upstream is None:
            raise EngineFailed("no upstream: the engine was not loaded")
        return self.upstream


def _api_key(variable: str | None) -> str | None:
    """The key from the environment variable the configuration names (never from the configuration)."""
    if not variable:
        return None
    key = os.environ.get(variable, "").strip()
    if not key:
        raise EngineUnavailable(
            f"upstream.api_key_env names {variable}, which is unset or empty in the daemon's environment"
        )
    return key


def _choose(configured: str | None, listed: list[str], base_url: str) -> str:
    """The configured model if the upstream lists it (Ollama lists ``name:latest`` for ``name``), else the first listed.

    Never ``ModelError(missing=True)``: its code, model_not_found, makes the
    circuit's probe look for a model file, which a remote engine does not have.
    """
    if configured is None:
        if not listed:
            raise ModelError(f"{base_url} lists no models; set upstream.model")
        return listed[0]
    if configured in listed or f"{configured}:latest" in listed:
        return configured
    raise ModelError(
        f"{base_url} does not list model {configured!r}; it lists: {', '.join(listed[:MAX_LISTED]) or 'none'}"
    )


def _result(finish: str, usage: dict[str, Any], sent: int) -> GenerateResult:
    """The upstream's own counts where it gave them; never fewer completion tokens than pieces sent."""
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    prompt = prompt if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0 else 0
    completion = max(completion, sent) if isinstance(completion, int) and not isinstance(completion, bool) else sent
    return GenerateResult(finish_reason=finish, prompt_tokens=prompt, completion_tokens=completion)


def create_engine() -> OpenAIRemoteEngine:
    return OpenAIRemoteEngine()
