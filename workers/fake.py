"""A fake engine for supervision tests: real worker process, scripted behaviour.

Behaviour comes from the engine's ``options`` in the load spec and can be
changed while the worker runs by writing JSON to the file named by the
``control_file`` option (read before each request), so a test can make a
running worker slow, crash or hang.

Options:
  load_time_s        seconds "loading" takes (progress reported)
  token_delay_s      seconds between tokens
  fail_load          "model" -> ModelError, "unavailable" -> EngineUnavailable, "crash" -> exit 1
  crash_after_tokens exit(1) abruptly after this many tokens of a request
  hang_after_tokens  stop responding (the whole process blocks) after this many tokens
  stuck_after_tokens generation blocks after this many tokens, heartbeats go on
                     (a worker that looks alive but cannot generate)
  control_file       path of a JSON file whose keys override the options above
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from .engine import (
    EmitFn,
    EngineUnavailable,
    GenerateRequest,
    GenerateResult,
    ModelError,
    ProgressFn,
    StopFn,
)
from .protocol import FINISH_CANCELLED, FINISH_LENGTH

WORDS = "the quick brown fox jumps over the lazy dog".split()


class FakeEngine:
    kind = "fake"

    def __init__(self) -> None:
        self._options: dict[str, Any] = {}

    def versions(self) -> dict[str, Any]:
        return {"fake_engine": "1"}

    def _current(self) -> dict[str, Any]:
        options = dict(self._options)
        control = options.get("control_file")
        if control and Path(control).is_file():
            try:
                options.update(json.loads(Path(control).read_text()))
            except ValueError:
                pass  # a half-written control file: keep the last behaviour
        return options

    def load(self, spec: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        self._options = dict(spec.get("options") or {})
        options = self._current()
        failure = options.get("fail_load")
        if failure == "model":
            raise ModelError("fake: model refused to load")
        if failure == "unavailable":
            raise EngineUnavailable("fake: engine unavailable")
        if failure == "crash":
            os._exit(1)
        steps = 5
        for step in range(steps):
            progress(step / steps, "fake loading")
            time.sleep(float(options.get("load_time_s", 0.0)) / steps)
        return {"model": "fake", "model_name": "fake", "n_ctx": 4096}

    def generate(self, request: GenerateRequest, emit: EmitFn, should_stop: StopFn) -> GenerateResult:
        options = self._current()
        delay = float(options.get("token_delay_s", 0.0))
        crash_after = options.get("crash_after_tokens")
        hang_after = options.get("hang_after_tokens")
        stuck_after = options.get("stuck_after_tokens")
        produced = 0
        finish = FINISH_LENGTH
        while produced < request.max_tokens:
            if should_stop():
                finish = FINISH_CANCELLED
                break
            if crash_after is not None and produced >= int(crash_after):
                os._exit(1)
            if hang_after is not None and produced >= int(hang_after):
                _hang()
            if stuck_after is not None and produced >= int(stuck_after):
                threading.Event().wait()  # forever; only this thread
            time.sleep(delay)
            emit(WORDS[produced % len(WORDS)] + " ")
            produced += 1
        prompt_tokens = len((request.prompt or "").split()) or 1
        return GenerateResult(finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=produced)


def _hang() -> None:
    """Block the whole process, heartbeat thread included, like a wedged driver call."""
    import signal

    os.kill(os.getpid(), signal.SIGSTOP)


def create_engine() -> FakeEngine:
    return FakeEngine()
