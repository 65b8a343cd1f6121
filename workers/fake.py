"""A fake engine for supervision tests: real worker process, scripted behaviour.

Behaviour comes from the engine's ``options`` in the load spec and can be
changed while the worker runs by writing JSON to the file named by the
``control_file`` option (read before each request), so a test can make a
running worker slow, crash or hang.

Options:
  load_time_s        seconds "loading" takes (progress reported)
  token_delay_s      seconds per token (a message of n tokens waits n times this)
  tokens_per_event   tokens (words) sent in one emit, default 1, as an engine
                     that streams chunks (ExLlamaV2) or releases held-back
                     text (stop strings) does; the last one of a request
                     holds fewer when max_tokens is not a multiple of it
  fail_load          "model" -> ModelError, "unavailable" -> EngineUnavailable, "crash" -> exit 1
  oom_above_layers   a load asked for more GPU layers than this (-1: all) fails as out of GPU memory
  crash_after_tokens exit(1) abruptly after this many tokens of a request
  hang_after_tokens  stop responding (the whole process blocks) after this many tokens
  stuck_after_tokens generation blocks after this many tokens, heartbeats go on
                     (a worker that looks alive but cannot generate)
  echo_request       answer every request with one token: the JSON of its prompt, messages and
                     sampling settings as the worker received them (tests of what reaches an engine)
  reply              the text to generate instead of the words (then finish "stop"), sent in
                     pieces of reply_chunk characters (default 3), one token each: a
                     canned model output (tool calls, say) split across tokens
  control_file       path of a JSON file whose keys override the options above
  embedding_dims     length of an embedding (default 8)
  embed_delay_s      seconds per input of an embed request

With ``embedding`` in the load spec it embeds instead of generating: a
deterministic vector per input (from its text or token ids, so the same input
gets the same vector in any batch), L2-normalized unless ``normalize`` is
false; each input counts as one token for crash_after_tokens and the like.

With ``parallel`` above 1 in the load spec it is a BatchEngine: each step
waits ``token_delay_s`` once and gives every running request one token, as
a batched decode does.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from .engine import (
    EmbedProgressFn,
    EmbedResult,
    EmitFn,
    EngineUnavailable,
    GenerateResult,
    ModelError,
    OutOfGpuMemory,
    ProgressFn,
    StopFn,
)
from .protocol.messages import CAP_EMBEDDINGS, GENERATE_CAPABILITIES, Embed, Generate, LoadSpec, Sampling
from .protocol import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, WORKER_CURVE_ENV, WORKER_SECRET_ENV

WORDS = "the quick brown fox jumps over the lazy dog".split()


class FakeEngine:
    kind = "fake"

    def __init__(self) -> None:
        self._options: dict[str, Any] = {}
        self.slots = 1
        self.capabilities: tuple[str, ...] = GENERATE_CAPABILITIES
        self._normalize = True
        self._batch: dict[str, list[Any]] = {}  # request id -> [request, emit, tokens produced]

    def versions(self) -> dict[str, Any]:
        # Whether engine code can still read the worker's secret or CURVE keys (it
        # must not: the runtime takes them out of the environment first); tests check it.
        return {
            "fake_engine": "1",
            "sees_worker_secret": _environment_has(WORKER_SECRET_ENV),
            "sees_worker_curve": _environment_has(WORKER_CURVE_ENV),
        }

    def _current(self) -> dict[str, Any]:
        options = dict(self._options)
        control = options.get("control_file")
        if control and Path(control).is_file():
            try:
                options.update(json.loads(Path(control).read_text()))
            except ValueError:
                pass  # a half-written control file: keep the last behaviour
        return options

    def load(self, spec: LoadSpec, progress: ProgressFn) -> dict[str, Any]:
        self._options = dict(spec.options or {})
        options = self._current()
        failure = options.get("fail_load")
        if failure == "model":
            raise ModelError("fake: model refused to load")
        if failure == "unavailable":
            raise EngineUnavailable("fake: engine unavailable")
        if failure == "crash":
            os._exit(1)
        limit, layers = options.get("oom_above_layers"), int(spec.n_gpu_layers or 0)
        if limit is not None and (layers < 0 or layers > int(limit)):
            raise OutOfGpuMemory(f"fake: {layers} GPU layers do not fit (at most {limit})")
        self.slots = max(1, int(spec.parallel or 1))
        # It samples nothing: it lists what a test wants it to (option capabilities), by default all a
        # generating engine can list, or embeddings alone in embedding mode.
        own = (CAP_EMBEDDINGS,) if spec.embedding else GENERATE_CAPABILITIES
        self.capabilities = tuple(options.get("capabilities", own))
        self._normalize = spec.normalize
        steps = 5
        for step in range(steps):
            progress(step / steps, "fake loading")
            time.sleep(float(options.get("load_time_s", 0.0)) / steps)
        return {"model": "fake", "model_name": "fake", "n_ctx": 4096}

    def generate(self, request: Generate, emit: EmitFn, should_stop: StopFn) -> GenerateResult:
        emit = _with_logprobs(emit, request.params)
        options = self._current()
        if options.get("echo_request"):
            return _echo(request, emit)
        delay = float(options.get("token_delay_s", 0.0))
        per_event = max(1, int(options.get("tokens_per_event", 1)))
        produced = 0
        finish = FINISH_LENGTH
        if options.get("reply") is not None:
            return self._reply(request, emit, str(options["reply"]), max(1, int(options.get("reply_chunk", 3))))
        while produced < request.params.max_tokens:
            if should_stop():
                finish = FINISH_CANCELLED
                break
            _misbehave(options, produced)
            count = min(per_event, request.params.max_tokens - produced)
            if not _sleep_unless(delay * count, should_stop):
                finish = FINISH_CANCELLED
                break
            emit("".join(WORDS[(produced + i) % len(WORDS)] + " " for i in range(count)), count)
            produced += count
        prompt_tokens = len((request.prompt or "").split()) or 1
        return GenerateResult(finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=produced)

    def _reply(self, request: Generate, emit: EmitFn, reply: str, chunk: int) -> GenerateResult:
        pieces = [reply[i : i + chunk] for i in range(0, len(reply), chunk)][: request.params.max_tokens]
        for piece in pieces:
            emit(piece, 1)
        finish = FINISH_STOP if len(pieces) * chunk >= len(reply) else FINISH_LENGTH
        return GenerateResult(finish_reason=finish, prompt_tokens=1, completion_tokens=len(pieces))

    def embed(self, request: Embed, progress: EmbedProgressFn) -> EmbedResult | None:
        options = self._current()
        dims, delay = int(options.get("embedding_dims", 8)), float(options.get("embed_delay_s", 0.0))
        vectors, tokens = [], 0
        for i, item in enumerate(request.inputs):
            _misbehave(options, i)
            time.sleep(delay)
            key = item.encode("utf-8") if isinstance(item, str) else json.dumps(list(item)).encode()
            vector = [b / 255.0 - 0.5 for b in hashlib.sha256(key).digest()[:dims]]
            if self._normalize:
                norm = math.sqrt(sum(x * x for x in vector)) or 1.0
                vector = [x / norm for x in vector]
            vectors.append(vector)
            count = len(item.split()) or 1 if isinstance(item, str) else len(item)
            tokens += count
            if progress(count):
                return None
        return EmbedResult(vectors=vectors, prompt_tokens=tokens)

    # --- several requests at once (BatchEngine) ---------------------------------------

    def begin(self, request: Generate, emit: EmitFn) -> None:
        self._batch[request.request_id] = [request, _with_logprobs(emit, request.params), 0]

    def step(self) -> list[tuple[str, GenerateResult]]:
        options = self._current()
        time.sleep(float(options.get("token_delay_s", 0.0)))
        ended = []
        for request_id, entry in list(self._batch.items()):
            request, emit, produced = entry
            _misbehave(options, produced)
            emit(WORDS[produced % len(WORDS)] + " ", 1)
            entry[2] = produced + 1
            if entry[2] >= request.params.max_tokens:
                ended.append((request_id, self._result(request_id, FINISH_LENGTH)))
        return ended

    def end(self, request_id: str) -> GenerateResult:
        return self._result(request_id, FINISH_CANCELLED)

    def _result(self, request_id: str, finish: str) -> GenerateResult:
        request, _emit, produced = self._batch.pop(request_id)
        return GenerateResult(
            finish_reason=finish, prompt_tokens=len((request.prompt or "").split()) or 1, completion_tokens=produced
        )


def _sleep_unless(seconds: float, should_stop: StopFn) -> bool:
    """Wait as a slow model computes, but let a cancel in between tokens, as a real engine checks one
    between two decodes (a long token_delay_s must not hold a cancelled request): False when it came."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
        if should_stop():
            return False
    return True


def _echo(request: Generate, emit: EmitFn) -> GenerateResult:
    """The request as this engine received it, as one token of JSON."""
    seen = {"prompt": request.prompt, "messages": request.messages, "params": dataclasses.asdict(request.params)}
    emit(json.dumps(seen, sort_keys=True), 1)
    return GenerateResult(
        finish_reason=FINISH_STOP, prompt_tokens=len((request.prompt or "").split()) or 1, completion_tokens=1
    )


def _with_logprobs(emit: Any, params: Sampling) -> Any:
    """For a request that asked: each word an entry, its logprob -1, its alternatives the words after it."""
    if not params.logprobs:
        return emit

    def entry(word: str, logprob: float) -> dict[str, Any]:
        return {"token": word, "logprob": logprob, "bytes": list(word.encode())}

    def emit_with_entries(text: str, tokens: int = 1) -> None:
        words = [word + " " for word in text.split()]
        entries = []
        for word in words:
            at = WORDS.index(word.strip())
            top = [entry(WORDS[(at + i) % len(WORDS)] + " ", -1.0 - i) for i in range(params.top_logprobs)]
            entries.append({**entry(word, -1.0), "top_logprobs": top})
        emit(text, tokens, entries)

    return emit_with_entries


def _misbehave(options: dict[str, Any], produced: int) -> None:
    """Crash, hang or get stuck once ``produced`` tokens are out, as the options say."""
    crash_after = options.get("crash_after_tokens")
    hang_after = options.get("hang_after_tokens")
    stuck_after = options.get("stuck_after_tokens")
    if crash_after is not None and produced >= int(crash_after):
        os._exit(1)
    if hang_after is not None and produced >= int(hang_after):
        _hang()
    if stuck_after is not None and produced >= int(stuck_after):
        threading.Event().wait()  # forever; only this thread


def _environment_has(name: str) -> bool:
    """Whether ``name`` is set for Python code or for C code (getenv) in this process."""
    if name in os.environ:
        return True
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # no C library to ask this way (Windows)
        return False
    libc.getenv.restype = ctypes.c_char_p
    return libc.getenv(name.encode()) is not None


def _hang() -> None:
    """Block the whole process, heartbeat thread included, like a wedged driver call."""
    import signal

    os.kill(os.getpid(), signal.SIGSTOP)


def create_engine() -> FakeEngine:
    return FakeEngine()
