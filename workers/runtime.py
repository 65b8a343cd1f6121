"""The worker runtime: hello -> load -> serve, with a watchdog thread.

The engine arrives already imported (__main__.py imports it before this
module, and so before pyzmq: a CUDA build of llama.cpp crashed when a ZeroMQ
context existed before it was loaded).

Two threads, each owning one DEALER socket to the daemon (ZeroMQ sockets are
not thread-safe, so neither thread touches the other's):

* the main thread loads the model and generates, one request at a time (a
  llama.cpp context is not safe for concurrent calls).
  Its socket carries the conversation: load and generate in, tokens and
  results out, and cancel / shutdown, which it reads between two tokens.
  Sending a token is one call on the generating thread: no other thread has
  to wake up for it, which matters when the engine's compute threads already
  keep every core busy.
* the watchdog thread sends heartbeats (phase, request, last-token time) on a
  socket of its own, so a main thread stuck inside the engine still shows as
  alive-but-stuck, and ends the process when the daemon has been silent for
  ``orphan_after`` seconds: a worker never outlives its supervisor holding a
  model in memory.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

import zmq

from . import protocol as p
from .batch import BatchLoop
from .conversation import Conversation
from .engine import EngineFailed, EngineUnavailable, ModelError, PreparedEngine, RequestError
from .embedding import serve_embed
from .protocol.messages import Embed, Failed, Generate, Heartbeat, Hello, Load, LoadFailed, Loading, Message, Ready
from .process import die_orphaned, name_this_thread
from .tool_emitter import with_tool_calls

log = logging.getLogger("worker")


class WorkerRuntime:
    def __init__(
        self,
        prepared: PreparedEngine,
        endpoint: str,
        worker_id: str,
        heartbeat_interval: float,
        secret: str | None = None,
        curve: tuple[str, str, str] | None = None,
    ) -> None:
        """``secret``: the daemon's per-spawn secret, which goes into both
        sockets' routing ids so the daemon knows them for this worker's.
        ``curve``: (server public, own public, own secret) for a tcp endpoint."""
        self.prepared = prepared
        self.engine_kind = prepared.kind
        self.endpoint = endpoint
        self.worker_id = worker_id
        self.heartbeat_interval = heartbeat_interval
        self.orphan_after = 3 * heartbeat_interval
        self._routing_id = p.worker_routing_id(worker_id, secret)
        self._curve = curve
        self._context = zmq.Context()
        self.conversation = Conversation(self._connect(self._routing_id))
        self._watchdog = threading.Thread(target=self._watchdog_loop, name="watchdog", daemon=True)

    def _connect(self, identity: str) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity.encode())
        sock.setsockopt(zmq.LINGER, 2000)  # let the last messages (load_failed, done) leave
        # A DEALER blocks its sender at the high-water mark: the generating thread must never
        # wait on a slow daemon (a silent one is left by the watchdog: the process ends).
        sock.setsockopt(zmq.SNDHWM, 0)
        if self._curve is not None:
            for option, key in zip((zmq.CURVE_SERVERKEY, zmq.CURVE_PUBLICKEY, zmq.CURVE_SECRETKEY), self._curve):
                sock.setsockopt(option, key.encode("ascii"))
        sock.connect(self.endpoint)
        return sock

    # --- main thread ---------------------------------------------------------

    def run(self) -> int:
        self._watchdog.start()
        try:
            code = self._main()
        except Exception:
            traceback.print_exc()
            code = p.ExitCode.CRASH
        self.conversation.socket.close()
        # Waits (up to the linger) until the last messages are out; the
        # watchdog's wait ends with ContextTerminated and it closes its socket.
        self._context.term()
        return code

    def _main(self) -> int:
        # Hello goes out even when the engine cannot run here, so status shows
        # what this environment holds (NumPy, torch, ...) next to the reason.
        self._send_hello()
        engine = self.prepared.engine
        if engine is None:
            return self._fail(p.ExitCode.UNAVAILABLE, "unavailable", self.prepared.unavailable or "engine unavailable")
        load = self.conversation.next_command()
        if load is None:
            return p.ExitCode.OK
        if not isinstance(load, Load) or load.spec is None:
            daemon = load.protocol if isinstance(load, Load) else "none (a generate before any load)"
            mismatch = f"worker speaks protocol {p.PROTOCOL_VERSION}, daemon {daemon}"
            return self._fail(p.ExitCode.PROTOCOL_MISMATCH, "protocol_mismatch", mismatch)
        self.conversation.activity["phase"] = "loading"
        try:
            facts = engine.load(load.spec, self._report_progress)
        except ModelError as exc:
            return self._fail(p.ExitCode.MODEL_ERROR, exc.code, str(exc))
        except EngineUnavailable as exc:
            return self._fail(p.ExitCode.UNAVAILABLE, "unavailable", str(exc))
        except EngineFailed as exc:  # a remote engine's upstream unreachable or refusing: a crash, retried with backoff
            return self._fail(p.ExitCode.CRASH, exc.code, str(exc), exc.retry_after_s)
        self.conversation.activity["phase"] = "idle"
        slots = getattr(engine, "slots", 1)
        self._send(Ready(model=facts, slots=slots, capabilities=tuple(getattr(engine, "capabilities", ()))))
        log.info("ready: %s (%d at once)", facts.get("model_name"), slots)
        if slots > 1:
            BatchLoop(self.conversation, engine).run()
            return p.ExitCode.OK
        try:
            while (message := self.conversation.next_command()) is not None:
                if isinstance(message, Generate):  # a second load has nothing to do
                    self._serve(engine, message)
                elif isinstance(message, Embed):
                    serve_embed(self.conversation, engine, message)
        except EngineFailed as exc:  # the request it ran is the daemon's to retry or fail, as after a crash
            log.error("%s: %s", exc.code, exc)
            self._send(Failed(code=exc.code, message=str(exc), retry_after_s=exc.retry_after_s))
            return p.ExitCode.CRASH
        return p.ExitCode.OK

    def _send_hello(self) -> None:
        """Introduce the worker by its plain id (the routing id carries the secret)."""
        self._send(
            Hello(
                protocol=p.PROTOCOL_VERSION,
                engine=self.engine_kind,
                worker_id=self.worker_id,
                pid=os.getpid(),
                python=sys.version.split()[0],
                executable=sys.executable,
                packages=installed_versions(),
                versions=self.prepared.versions,
            )
        )

    def _fail(self, exit_code: int, code: str, message: str, retry_after_s: float | None = None) -> int:
        log.error("%s: %s", code, message)
        self._send(LoadFailed(code=code, message=message, exit_code=exit_code, retry_after_s=retry_after_s))
        return exit_code

    def _report_progress(self, fraction: float, message: str) -> None:
        self._send(Loading(progress=round(fraction, 3), message=message))

    def _serve(self, engine: Any, request: Generate) -> None:
        conversation = self.conversation
        rid = request.request_id
        started = time.monotonic()
        deadline = started + request.deadline_ms / 1000 if request.deadline_ms else None
        conversation.activity.update(phase="generating", request_id=rid, tokens=0, last_token_at=started)
        emit = with_tool_calls(
            conversation.emitter(rid, logprobs=request.params.logprobs), request, conversation.activity
        )

        def should_stop() -> bool:
            conversation.read_commands()
            return (
                conversation.stopping
                or rid in conversation.cancelled
                or (deadline is not None and time.monotonic() >= deadline)
            )

        try:
            result = engine.generate(request, emit, should_stop)
        except RequestError as exc:
            conversation.send_error(rid, exc.code, exc.message)
        except EngineFailed:
            raise  # no answer for the request: the worker exits (_main)
        except Exception as exc:
            traceback.print_exc()
            conversation.send_error(rid, p.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        else:
            conversation.send_done(rid, result, started, emit)
        finally:
            conversation.forget(rid)
            conversation.activity.update(phase="idle", request_id=None)

    def _send(self, message: Message) -> None:
        self.conversation.send(message)

    # --- watchdog thread -----------------------------------------------------

    def _watchdog_loop(self) -> None:
        name_this_thread("watchdog")
        sock = self._connect(p.watchdog_identity(self._routing_id))
        last_heard = time.monotonic()
        next_heartbeat = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_heartbeat:
                    sock.send(p.encode(self._heartbeat(now).to_wire()))
                    next_heartbeat = now + self.heartbeat_interval
                if now - last_heard > self.orphan_after:
                    die_orphaned(now - last_heard)
                timeout_ms = max(0.0, min(next_heartbeat, last_heard + self.orphan_after) - now) * 1000
                if sock.poll(timeout_ms + 1):
                    while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        sock.recv(zmq.NOBLOCK)  # daemon heartbeats: only their arrival matters
                    last_heard = time.monotonic()
        except zmq.ContextTerminated:  # the main thread is done: run() is terminating the context
            pass
        finally:
            sock.close(linger=0)

    def _heartbeat(self, now: float) -> Heartbeat:
        activity = dict(self.conversation.activity)
        last_token_at = activity.pop("last_token_at")
        age_ms = None if last_token_at is None else round((now - last_token_at) * 1000, 1)
        return Heartbeat(**activity, last_token_age_ms=age_ms)


def installed_versions() -> dict[str, str | None]:
    """Versions of the packages that tell environments apart, read without importing them."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for dist in ("numpy", "torch", "llama-cpp-python", "exllamav2", "pyzmq"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions
