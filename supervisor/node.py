"""The node: owns the client server, the worker server, the engines and their slots.

Single-threaded asyncio.  Clients talk to a ROUTER socket, workers to another;
every decision about a request is taken here, in one thread, so "exactly one
terminal event per request" is a property of :meth:`_finish` alone.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from workers import protocol as p
from workers.protocol import ErrorCode

from . import __version__
from .config import Settings
from .envs import env_dir, env_is_current, env_python, worker_environ
from .lifecycle import SlotState
from .logs import get_logger
from .models import model_path_for
from .policy import Backoff, retry_can_help
from .requests import InvalidMessage, message_id, message_op, parse_cancel_target, parse_generate
from .scheduler import EngineRuntime, Request
from .slot import WorkerSlot

log = get_logger("supervisor.node")


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = zmq.asyncio.Context()
        self.engines: dict[str, EngineRuntime] = {}
        self.requests: dict[tuple[bytes, str], Request] = {}
        self._slots_by_worker: dict[str, WorkerSlot] = {}
        self._backoff: dict[str, Backoff] = {}
        self._wire_ids = itertools.count(1)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.started_at = time.monotonic()
        self.stopping = False
        self.worker_endpoint = ""

    # --- start and stop --------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """The one way to stop: signals, service stop and admin stop all end here."""
        if not self._stop.is_set():
            log.info("stop requested", reason=reason)
            self._stop.set()

    async def run(self) -> None:
        self._bind()
        self._build_engines()
        for engine in self.engines.values():
            if engine.slot and not engine.unusable:
                await engine.slot.spawn("daemon start")
        self._tasks = [
            asyncio.ensure_future(self._client_loop()),
            asyncio.ensure_future(self._worker_loop()),
            asyncio.ensure_future(self._watch_loop()),
        ]
        log.info("daemon serving", client_endpoint=self.settings.client_endpoint, pid=os.getpid(), engines=list(self.engines))
        await self._stop.wait()
        await self._shutdown()

    def _bind(self) -> None:
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        limit = self.settings.max_message_bytes
        self.clients = self.context.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished client raises instead of dropping silently
        self.clients.setsockopt(zmq.LINGER, 1000)
        # Frames up to 4x the limit still get a proper message_too_large reply;
        # beyond that libzmq drops the connection before we see the frame.
        self.clients.setsockopt(zmq.MAXMSGSIZE, max(4 * limit, 16 << 20))
        self.clients.bind(self.settings.client_endpoint)
        _restrict_ipc(self.settings.client_endpoint)
        self.workers = self.context.socket(zmq.ROUTER)
        self.workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.workers.setsockopt(zmq.LINGER, 1000)
        self.workers.bind(self.settings.worker_endpoint)
        _restrict_ipc(self.settings.worker_endpoint)
        self.worker_endpoint = self.workers.getsockopt_string(zmq.LAST_ENDPOINT)

    def _build_engines(self) -> None:
        environ = worker_environ(self.settings)
        for name, config in self.settings.engines.items():
            model = model_path_for(self.settings, config)
            slot = WorkerSlot(
                engine_name=name,
                kind=config.kind,
                python=env_python(env_dir(self.settings, config.env_name)),
                worker_endpoint=self.worker_endpoint,
                heartbeat_interval=self.settings.heartbeat_interval_s,
                environ=environ,
                send=self._send_worker,
                on_exit=self._on_worker_exit,
            )
            engine = EngineRuntime(name, config, str(model), slot)
            self.engines[name] = engine
            self._backoff[name] = Backoff()
            if config.kind != "fake" and not model.exists():
                engine.unusable = (ErrorCode.MODEL_NOT_FOUND, f"model file not found: {model}")
            elif not env_is_current(self.settings, config.env_name, config.kind):
                engine.unusable = (
                    ErrorCode.ENGINE_UNAVAILABLE,
                    f"environment {config.env_name!r} is missing or stale; run: node-supervisor envs create {config.env_name}",
                )
            if engine.unusable:
                log.error("engine cannot serve", engine=name, code=engine.unusable[0], reason=engine.unusable[1])

    async def _shutdown(self) -> None:
        self.stopping = True
        for engine in self.engines.values():
            while engine.queue:
                self._fail(engine.queue.popleft(), ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
        # In-flight requests get the grace period to finish, then an error.
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while any(e.slot and e.slot.current for e in self.engines.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request in list(self.requests.values()):
            self._fail(request, ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
        slots = [e.slot for e in self.engines.values() if e.slot]
        await asyncio.gather(*(slot.terminate(self.settings.shutdown_grace_s) for slot in slots))
        for task in self._tasks:
            task.cancel()
        self.clients.close()
        self.workers.close()
        self.context.term()
        log.info("daemon stopped")

    # --- clients -------------------------------------------------------------

    async def _client_loop(self) -> None:
        while True:
            frames = await self.clients.recv_multipart(copy=True)
            envelope, payload = frames[:-1], frames[-1]
            try:
                self._on_client_message(envelope, payload)
            except Exception:  # a bug must not take the daemon down
                log.exception("internal error handling a client message")
                self._reply(envelope, {"id": None, "event": p.EVENT_ERROR, "code": ErrorCode.INTERNAL, "message": "internal error; see the daemon log"})

    def _on_client_message(self, envelope: list[bytes], payload: bytes) -> None:
        if len(payload) > self.settings.max_message_bytes:
            self._reply_error(envelope, None, ErrorCode.TOO_LARGE, f"message is {len(payload)} bytes; the limit is {self.settings.max_message_bytes}")
            return
        try:
            message = p.decode(payload)
        except p.DecodeError as exc:
            self._reply_error(envelope, None, ErrorCode.MALFORMED, str(exc))
            return
        raw_id = message.get("id") if isinstance(message.get("id"), str) else None
        try:
            op = message_op(message)
            mid = message_id(message)
            if op == p.OP_GENERATE:
                self._on_generate(envelope, mid, message)
            elif op == p.OP_CANCEL:
                self._on_cancel(envelope, mid, parse_cancel_target(message))
            elif op == p.OP_STATUS:
                self._reply(envelope, {"id": mid, "event": p.EVENT_STATUS, **self.status()})
            elif op == p.OP_PING:
                self._reply(envelope, {"id": mid, "event": p.EVENT_PONG, "protocol": p.PROTOCOL_VERSION, "version": __version__})
        except InvalidMessage as exc:
            self._reply_error(envelope, raw_id, exc.code, exc.message)

    def _on_generate(self, envelope: list[bytes], mid: str, message: dict[str, Any]) -> None:
        if self.stopping:
            raise InvalidMessage(ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
        params = parse_generate(message, self.settings.max_tokens_limit)
        client = b"".join(envelope)
        if (client, mid) in self.requests:
            raise InvalidMessage(ErrorCode.DUPLICATE_ID, f"id {mid!r} is still in use by a running request")
        engine = self._choose_engine(params.engine)
        if engine.queue_full:
            raise InvalidMessage(ErrorCode.BUSY, f"engine {engine.name!r} has {len(engine.queue)} requests waiting (max_queue)")
        request = Request(client=client, id=mid, params=params, envelope=envelope, engine=engine.name)
        self.requests[request.key] = request
        if params.deadline_ms is not None:
            loop = asyncio.get_running_loop()
            request.deadline_timer = loop.call_later(params.deadline_ms / 1000, self._on_deadline, request)
        engine.queue.append(request)
        self._pump(engine)

    def _choose_engine(self, pinned: str | None) -> EngineRuntime:
        if pinned is not None:
            engine = self.engines.get(pinned)
            if engine is None:
                raise InvalidMessage(ErrorCode.UNKNOWN_ENGINE, f"no engine named {pinned!r}; configured: {', '.join(self.engines)}")
            if engine.unusable:
                raise InvalidMessage(*engine.unusable)
            return engine
        usable = [e for e in self.engines.values() if not e.unusable]
        if not usable:
            reasons = "; ".join(f"{e.name}: {e.unusable[1]}" for e in self.engines.values() if e.unusable)
            raise InvalidMessage(ErrorCode.NO_ENGINE, f"no engine can serve: {reasons}")
        return min(usable, key=lambda e: e.config.priority)

    def _on_cancel(self, envelope: list[bytes], mid: str, target: str) -> None:
        request = self.requests.get((b"".join(envelope), target))
        self._reply(envelope, {"id": mid, "event": p.EVENT_CANCEL_ACK, "target": target, "found": request is not None})
        if request is not None:
            self._cancel(request)

    def _cancel(self, request: Request) -> None:
        """Stop a request: a queued one ends here, a running one when its worker confirms."""
        engine = self.engines[request.engine]
        if engine.remove(request):
            self._done(request, p.FINISH_CANCELLED, {"prompt_tokens": 0, "completion_tokens": 0}, {})
        elif engine.slot and engine.slot.current is request:
            engine.slot.send({"type": p.S_CANCEL, "request_id": request.wire_id})

    def _on_deadline(self, request: Request) -> None:
        if request.finished:
            return
        engine = self.engines[request.engine]
        running = engine.slot is not None and engine.slot.current is request
        self._fail(request, ErrorCode.DEADLINE, f"deadline of {request.params.deadline_ms} ms passed")
        if running:
            engine.slot.send({"type": p.S_CANCEL, "request_id": request.wire_id})
        else:
            engine.remove(request)

    # --- dispatch ------------------------------------------------------------

    def _pump(self, engine: EngineRuntime) -> None:
        """Give the engine's idle worker the oldest waiting request."""
        slot = engine.slot
        while slot is not None and slot.idle and engine.queue:
            request = engine.queue.popleft()
            if not request.finished:
                self._dispatch(slot, request)

    def _dispatch(self, slot: WorkerSlot, request: Request) -> None:
        now = time.monotonic()
        request.dispatched_at = now
        request.worker_id = slot.worker_id
        request.attempts += 1
        request.wire_id = f"r{next(self._wire_ids)}"
        slot.current = request
        params = request.params
        remaining_ms = None
        if params.deadline_ms is not None:
            remaining_ms = max(1, int(params.deadline_ms - (now - request.received_at) * 1000))
        slot.send(
            {
                "type": p.S_GENERATE,
                "request_id": request.wire_id,
                "prompt": params.prompt,
                "messages": params.messages,
                "params": params.sampling,
                "deadline_ms": remaining_ms,
            }
        )

    # --- workers -------------------------------------------------------------

    async def _worker_loop(self) -> None:
        while True:
            worker_id_raw, payload = (await self.workers.recv_multipart())[:2]
            try:
                self._on_worker_message(worker_id_raw.decode("utf-8", "replace"), p.decode(payload))
            except p.DecodeError as exc:
                log.error("undecodable message from a worker", worker_id=worker_id_raw, error=str(exc))
            except Exception:
                log.exception("internal error handling a worker message")

    def _on_worker_message(self, worker_id: str, message: dict[str, Any]) -> None:
        slot = self._slots_by_worker.get(worker_id) or self._claim(worker_id)
        if slot is None:
            # A worker from an earlier generation: it has no business here.
            self._send_worker(worker_id, {"type": p.S_SHUTDOWN})
            return
        slot.last_heard = time.monotonic()
        kind = message.get("type")
        if kind == p.W_HEARTBEAT:
            slot.heartbeat = message
        elif kind == p.W_HELLO:
            self._on_hello(slot, message)
        elif kind == p.W_LOADING:
            slot.load_progress = message.get("progress")
            log.info("loading", engine=slot.engine_name, worker_id=worker_id, progress=slot.load_progress, detail=message.get("message"))
        elif kind == p.W_READY:
            slot.model = message.get("model", {})
            slot.ready_at = time.monotonic()
            slot.set_state(SlotState.READY, "model loaded")
            self._pump(self.engines[slot.engine_name])
        elif kind == p.W_LOAD_FAILED:
            slot.load_failure = {k: message.get(k) for k in ("code", "message", "exit_code")}
            log.error("worker could not load", engine=slot.engine_name, worker_id=worker_id, **slot.load_failure)
        elif kind in (p.W_TOKEN, p.W_DONE, p.W_ERROR):
            self._on_request_event(slot, kind, message)
        else:
            log.error("unknown message type from a worker", worker_id=worker_id, type=kind)

    def _claim(self, worker_id: str) -> WorkerSlot | None:
        """Map a worker id to the slot that spawned it, on its first message."""
        for engine in self.engines.values():
            if engine.slot and engine.slot.worker_id == worker_id and engine.slot.process is not None:
                self._slots_by_worker = {k: v for k, v in self._slots_by_worker.items() if v is not engine.slot}
                self._slots_by_worker[worker_id] = engine.slot
                return engine.slot
        return None

    def _on_hello(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        slot.hello = message
        log.info("worker hello", engine=slot.engine_name, worker_id=slot.worker_id, pid=message.get("pid"), versions=message.get("versions"))
        if slot.state is not SlotState.SPAWNING:
            return
        slot.set_state(SlotState.LOADING, "hello received")
        config = self.engines[slot.engine_name].config
        spec = {
            "model": self.engines[slot.engine_name].model_path,
            "n_ctx": config.n_ctx,
            "n_threads": config.n_threads,
            "n_gpu_layers": config.n_gpu_layers,
            "chat_format": config.chat_format,
            "options": config.options,
        }
        slot.send({"type": p.S_LOAD, "protocol": p.PROTOCOL_VERSION, "spec": spec})

    def _on_request_event(self, slot: WorkerSlot, kind: str, message: dict[str, Any]) -> None:
        request = slot.current
        if request is None or request.wire_id != message.get("request_id"):
            return  # the end of a request already retried elsewhere
        now = time.monotonic()
        if kind == p.W_TOKEN:
            if request.finished:
                return
            request.tokens_sent += 1
            if request.first_token_at is None:
                request.first_token_at = now
            if request.params.stream:
                self._reply(request.envelope, {"id": request.id, "event": p.EVENT_TOKEN, "text": message.get("text", ""), "index": request.tokens_sent - 1})
            else:
                request.text.append(message.get("text", ""))
            return
        slot.current = None
        engine = self.engines[slot.engine_name]
        if kind == p.W_DONE:
            usage = message.get("usage", {})
            if not request.finished and request.first_token_at is not None:
                decode_ms = (now - request.first_token_at) * 1000
                engine.latency.record((request.first_token_at - request.received_at) * 1000, decode_ms, request.tokens_sent)
            self._done(request, message.get("finish_reason", p.FINISH_STOP), usage, message.get("timings", {}))
        else:
            self._fail(request, message.get("code", ErrorCode.INTERNAL), message.get("message", "worker error"))
        self._pump(engine)

    def _on_worker_exit(self, slot: WorkerSlot, returncode: int | None, cause: str) -> None:
        engine = self.engines[slot.engine_name]
        request, slot.current = slot.current, None
        failure = slot.load_failure or {}
        exit_info = slot.last_exit or {}
        expected = slot.state is SlotState.STOPPING or self.stopping
        (log.info if expected else log.error)(
            "worker exited",
            engine=slot.engine_name,
            worker_id=slot.worker_id,
            cause=cause,
            exit_code=exit_info.get("exit_code"),
            signal=exit_info.get("signal"),
            last_lines=exit_info.get("last_lines"),
        )
        if expected:
            if slot.state is SlotState.STOPPING:
                slot.set_state(SlotState.STOPPED, cause)
        elif not retry_can_help(returncode):
            reason = f"{failure.get('message') or cause} (exit code {returncode})"
            slot.set_state(SlotState.FAILED, reason)
            code = ErrorCode.MODEL_NOT_FOUND if returncode == p.ExitCode.MODEL_ERROR else ErrorCode.ENGINE_UNAVAILABLE
            engine.unusable = (code, reason)
        else:
            delay = self._backoff[engine.name].next_delay(slot.ready_at, time.monotonic())
            slot.restarts += 1
            slot.set_state(SlotState.BACKOFF, f"{cause}; restarting in {delay:.1f}s")
            asyncio.get_running_loop().call_later(delay, self._restart, slot)
        if request is not None and not request.finished:
            self._requeue_or_fail(engine, request, cause)
        if engine.unusable:
            self._reroute_queue(engine)

    def _restart(self, slot: WorkerSlot) -> None:
        if slot.state is SlotState.BACKOFF and not self.stopping:
            asyncio.ensure_future(slot.spawn("restart after backoff"))

    def _requeue_or_fail(self, engine: EngineRuntime, request: Request, cause: str) -> None:
        """A request whose worker died: retried once if nothing was streamed yet."""
        if request.tokens_sent == 0 and request.attempts < 2 and not self.stopping:
            request.dispatched_at = None
            target = engine if not engine.unusable else self._fallback_for(request)
            if target is not None:
                target.queue.appendleft(request)
                request.engine = target.name
                log.warning("retrying request after worker exit", request_id=request.id, engine=target.name, cause=cause)
                return
        self._fail(
            request,
            ErrorCode.ENGINE_FAILED,
            f"worker {request.worker_id} {cause} after {request.tokens_sent} tokens",
            usage={"prompt_tokens": None, "completion_tokens": request.tokens_sent},
        )

    def _fallback_for(self, request: Request) -> EngineRuntime | None:
        if request.params.engine is not None:
            return None
        try:
            return self._choose_engine(None)
        except InvalidMessage:
            return None

    def _reroute_queue(self, engine: EngineRuntime) -> None:
        """An engine that cannot serve hands its waiting requests to the next engine."""
        while engine.queue:
            request = engine.queue.popleft()
            target = self._fallback_for(request)
            if target is None:
                self._fail(request, *engine.unusable)  # type: ignore[misc]
            else:
                request.engine = target.name
                target.queue.append(request)
                self._pump(target)

    async def _watch_loop(self) -> None:
        """Heartbeats to workers; workers silent too long, or loading too long, are killed."""
        interval = self.settings.heartbeat_interval_s
        while True:
            now = time.monotonic()
            for engine in self.engines.values():
                slot = engine.slot
                if slot is None or slot.process is None or not slot.worker_id:
                    continue
                self._send_worker(slot.worker_id, {"type": p.S_HEARTBEAT})
                silent = now - (slot.last_heard or now)
                if slot.state in (SlotState.LOADING, SlotState.READY) and silent > 3 * interval:
                    log.error("worker silent; killing it", engine=engine.name, worker_id=slot.worker_id, silent_s=round(silent, 2))
                    slot.signal(9 if sys.platform != "win32" else 15)
                elif slot.state in (SlotState.SPAWNING, SlotState.LOADING) and now - (slot.started_at or now) > self.settings.load_timeout_s:
                    log.error("worker load timed out; killing it", engine=engine.name, worker_id=slot.worker_id)
                    slot.signal(9 if sys.platform != "win32" else 15)
            await asyncio.sleep(interval)

    def _send_worker(self, worker_id: str, message: dict[str, Any]) -> None:
        try:
            self.workers.send_multipart([worker_id.encode(), p.encode(message)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # Not connected yet, or already gone: the exit watcher handles the latter.
            log.debug("worker unreachable", worker_id=worker_id, error=str(exc))

    # --- terminal events -------------------------------------------------------

    def _done(self, request: Request, finish_reason: str, usage: dict[str, Any], worker_timings: dict[str, Any]) -> None:
        if not request.finish():
            return
        now = time.monotonic()
        usage = {
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", request.tokens_sent),
        }
        usage["total_tokens"] = (usage["prompt_tokens"] or 0) + (usage["completion_tokens"] or 0)
        timings = request.timings(now)
        if "prefill_ms" in worker_timings:
            timings["prefill_ms"] = worker_timings["prefill_ms"]
        event: dict[str, Any] = {
            "id": request.id,
            "event": p.EVENT_DONE,
            "finish_reason": finish_reason,
            "usage": usage,
            "timings": timings,
            "engine": request.engine,
            "worker": request.worker_id,
        }
        if not request.params.stream:
            event["text"] = "".join(request.text)
        self.engines[request.engine].served += 1
        self._terminal(request, event)

    def _fail(self, request: Request, code: str, message: str, usage: dict[str, Any] | None = None) -> None:
        if not request.finish():
            return
        event: dict[str, Any] = {"id": request.id, "event": p.EVENT_ERROR, "code": code, "message": message}
        event.update(engine=request.engine or None, worker=request.worker_id, timings=request.timings(time.monotonic()))
        if usage is not None:
            event["usage"] = usage
        if request.engine in self.engines:
            self.engines[request.engine].failed += 1
        self._terminal(request, event)

    def _terminal(self, request: Request, event: dict[str, Any]) -> None:
        self.requests.pop(request.key, None)
        self._reply(request.envelope, event)
        log.info(
            "request end",
            request_id=request.id,
            engine=request.engine,
            worker_id=request.worker_id,
            outcome=event["event"],
            code=event.get("code"),
            finish_reason=event.get("finish_reason"),
            tokens=request.tokens_sent,
            attempts=request.attempts,
            **event.get("timings", {}),
        )

    # --- replies and status ----------------------------------------------------

    def _reply_error(self, envelope: list[bytes], mid: str | None, code: str, message: str) -> None:
        self._reply(envelope, {"id": mid, "event": p.EVENT_ERROR, "code": code, "message": message})

    def _reply(self, envelope: list[bytes], event: dict[str, Any]) -> None:
        try:
            self.clients.send_multipart([*envelope, p.encode(event)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("client unreachable; cancelling its requests", error=str(exc))
            self._client_gone(b"".join(envelope))

    def _client_gone(self, client: bytes) -> None:
        """Nobody will read the answers: stop spending compute on them."""
        for request in [r for r in self.requests.values() if r.client == client]:
            request.finish()
            self.requests.pop(request.key, None)
            engine = self.engines[request.engine]
            if not engine.remove(request) and engine.slot and engine.slot.current is request:
                engine.slot.send({"type": p.S_CANCEL, "request_id": request.wire_id})

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "protocol": p.PROTOCOL_VERSION,
                "uptime_s": round(now - self.started_at, 1),
                "client_endpoint": self.settings.client_endpoint,
                "state_dir": str(self.settings.state_dir),
                "stopping": self.stopping,
                "requests_in_progress": len(self.requests),
            },
            "engines": [engine.describe(now) for engine in sorted(self.engines.values(), key=lambda e: e.config.priority)],
        }


def _restrict_ipc(endpoint: str) -> None:
    """Only the daemon's user (and group) may connect to its ipc sockets."""
    if endpoint.startswith("ipc://"):
        try:
            os.chmod(Path(endpoint[len("ipc://"):]), 0o660)
        except OSError:
            pass
