"""The node: owns the sockets, the engines and every request.

Single-threaded asyncio.  Clients talk to a ROUTER socket, workers to another,
watchers subscribe to a PUB socket.  Every decision about a request is taken
here, in one thread, so "exactly one terminal event per request" is a property
of :meth:`_finish` alone.  Keeping workers alive is supervise.py's job.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import zmq

from workers import protocol as p
from workers.protocol import ErrorCode

from . import __version__
from . import events as ev
from .config import Settings
from .engines import EngineRuntime
from .envs import env_dir, env_is_current, env_python, worker_environ
from .lifecycle import SlotState
from .logs import get_logger
from .models import model_path_for
from .requests import InvalidMessage, message_id, message_op, parse_cancel_target, parse_generate
from .scheduler import Request
from .slot import WorkerSlot
from .sockets import SocketReader, send_now
from .supervise import Supervisor

log = get_logger("supervisor.node")

CLIENT_BACKLOG_LIMIT = 100_000  # events queued for one client before it counts as gone


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = zmq.Context()
        self.engines: dict[str, EngineRuntime] = {}
        self.requests: dict[tuple[bytes, str], Request] = {}
        self.events = ev.EventPublisher(None)
        self._slots_by_worker: dict[str, WorkerSlot] = {}
        self._wire_ids = itertools.count(1)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.started_at = time.monotonic()
        self.stopping = False
        self.worker_endpoint = ""
        self.supervisor: Supervisor

    # --- start and stop --------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """The one way to stop: signals, service stop and admin stop all end here."""
        if not self._stop.is_set():
            log.info("stop requested", reason=reason)
            self._stop.set()

    async def run(self) -> None:
        self._bind()
        self._build_engines()
        self.supervisor = Supervisor(self)
        await self.supervisor.start()
        loop = asyncio.get_running_loop()
        self.client_reader.start(loop)
        self.worker_reader.start(loop)
        self._tasks = [asyncio.ensure_future(self._watch_loop())]
        log.info("daemon serving", client_endpoint=self.settings.client_endpoint, events_endpoint=self.settings.events_endpoint, pid=os.getpid(), engines=list(self.engines))
        await self._stop.wait()
        await self._shutdown()

    def _bind(self) -> None:
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        limit = self.settings.max_message_bytes
        self.clients = self._socket(zmq.ROUTER, self.settings.client_endpoint)
        self.clients.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished client raises instead of dropping silently
        # Frames up to 4x the limit still get a proper message_too_large reply;
        # beyond that libzmq drops the connection before we see the frame.
        self.clients.setsockopt(zmq.MAXMSGSIZE, max(4 * limit, 16 << 20))
        # Events a client leaves unread are held up to this many; a client that
        # far behind is treated as gone (its requests are cancelled).
        self.clients.setsockopt(zmq.SNDHWM, CLIENT_BACKLOG_LIMIT)
        self.client_reader = SocketReader(self.clients, self._on_client_frames)
        self.workers = self._socket(zmq.ROUTER, self.settings.worker_endpoint)
        self.workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.worker_endpoint = self.workers.getsockopt_string(zmq.LAST_ENDPOINT)
        self.worker_reader = SocketReader(self.workers, self._on_worker_frames)
        publisher = self._socket(zmq.PUB, self.settings.events_endpoint)
        publisher.setsockopt(zmq.SNDHWM, 10_000)
        self.events = ev.EventPublisher(publisher)

    def _socket(self, kind: int, endpoint: str | None) -> zmq.Socket:
        assert endpoint is not None
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.bind(endpoint)
        if endpoint.startswith("ipc://"):
            # Only the daemon's user (and group) may connect.
            try:
                os.chmod(Path(endpoint[len("ipc://"):]), 0o660)
            except OSError:
                pass
        return sock

    def _build_engines(self) -> None:
        environ = worker_environ(self.settings)
        now = time.monotonic()
        for name, config in self.settings.engines.items():
            model = model_path_for(self.settings, config)
            slot = WorkerSlot(
                engine_name=name,
                kind=config.kind,
                python=env_python(env_dir(self.settings, config.env_name)),
                worker_endpoint=self.worker_endpoint,
                heartbeat_interval=self.settings.heartbeat_interval_s,
                environ=environ,
                send=self.send_worker,
                on_exit=lambda *args: self.supervisor.on_exit(*args),
                on_state=self._publish_state,
            )
            engine = EngineRuntime(name, config, str(model), slot, self.settings.supervision)
            self.engines[name] = engine
            if not env_is_current(self.settings, config.env_name, config.kind):
                engine.hard_failure = (
                    ErrorCode.ENGINE_UNAVAILABLE,
                    f"environment {config.env_name!r} is missing or stale; run: node-supervisor envs create {config.env_name}",
                )
            elif config.kind == "llamacpp" and not model.exists():
                # The circuit's probe looks again later: the file may appear.
                engine.breaker.trip(now, ErrorCode.MODEL_NOT_FOUND, f"model file not found: {model}")
            if engine.refusal:
                log.error("engine cannot serve", engine=name, code=engine.refusal[0], reason=engine.refusal[1])

    def _publish_state(self, slot: WorkerSlot, old: SlotState, new: SlotState, reason: str) -> None:
        self.events.publish(ev.TOPIC_WORKER_STATE, engine=slot.engine_name, worker_id=slot.worker_id, old=old.value, new=new.value, reason=reason)

    async def _shutdown(self) -> None:
        self.stopping = True
        for engine in self.engines.values():
            while engine.queue:
                self._fail(engine.queue.popleft(), ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
        # In-flight requests get the grace period to finish, then an error.
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while any(e.slot.current and not e.slot.current.internal for e in self.engines.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request in list(self.requests.values()):
            self._fail(request, ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
        await asyncio.gather(*(e.slot.terminate(self.settings.shutdown_grace_s) for e in self.engines.values()))
        for task in self._tasks:
            task.cancel()
        self.client_reader.stop()
        self.worker_reader.stop()
        self.clients.close()
        self.workers.close()
        self.events.close()
        self.context.term()
        log.info("daemon stopped")

    # --- clients -------------------------------------------------------------

    def _on_client_frames(self, frames: list[bytes]) -> None:
        envelope, payload = frames[:-1], frames[-1]
        try:
            self._on_client_message(envelope, payload)
        except Exception:  # a bug must not take the daemon down
            log.exception("internal error handling a client message")
            self._reply_error(envelope, None, ErrorCode.INTERNAL, "internal error; see the daemon log")

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
        if engine.queue_full and not engine.slot.idle:
            raise InvalidMessage(ErrorCode.BUSY, f"engine {engine.name!r} has {len(engine.queue)} requests waiting (max_queue)")
        self.submit(engine, Request(client=client, id=mid, params=params, envelope=envelope, engine=engine.name))

    def submit(self, engine: EngineRuntime, request: Request) -> None:
        """Queue a request on an engine (starting a cold engine) and arm its deadline."""
        if not request.internal:
            self.requests[request.key] = request
        if request.params.deadline_ms is not None:
            loop = asyncio.get_running_loop()
            request.deadline_timer = loop.call_later(request.params.deadline_ms / 1000, self._on_deadline, request)
        engine.queue.append(request)
        self.supervisor.ensure_started(engine, "a request arrived")
        self.pump(engine)

    def _choose_engine(self, pinned: str | None) -> EngineRuntime:
        if pinned is not None:
            engine = self.engines.get(pinned)
            if engine is None:
                raise InvalidMessage(ErrorCode.UNKNOWN_ENGINE, f"no engine named {pinned!r}; configured: {', '.join(self.engines)}")
            if engine.refusal:
                raise InvalidMessage(*engine.refusal)
            return engine
        engine = self.supervisor.target_for_unpinned()
        if engine is None:
            reasons = "; ".join(f"{e.name}: {e.refusal[1]}" for e in self.engines.values() if e.refusal)
            raise InvalidMessage(ErrorCode.NO_ENGINE, f"no engine can serve: {reasons}")
        return engine

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
        elif engine.slot.current is request:
            engine.slot.send({"type": p.S_CANCEL, "request_id": request.wire_id})

    def _on_deadline(self, request: Request) -> None:
        if request.finished:
            return
        engine = self.engines[request.engine]
        running = engine.slot.current is request
        self._fail(request, ErrorCode.DEADLINE, f"deadline of {request.params.deadline_ms} ms passed")
        if running:
            engine.slot.send({"type": p.S_CANCEL, "request_id": request.wire_id})
        else:
            engine.remove(request)

    # --- dispatch ------------------------------------------------------------

    def pump(self, engine: EngineRuntime) -> None:
        """Give the engine's idle worker the oldest waiting request."""
        slot = engine.slot
        while slot.idle and engine.queue:
            request = engine.queue.popleft()
            if not request.finished:
                self._dispatch(slot, request)

    def _dispatch(self, slot: WorkerSlot, request: Request) -> None:
        now = time.monotonic()
        request.dispatched_at = now
        request.first_token_at = request.last_token_at = None
        request.worker_id = slot.worker_id
        request.attempts += 1
        request.wire_id = f"r{next(self._wire_ids)}"
        request.worker_token_prefix = p.token_frame_prefix(request.wire_id)
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

    def move_unpinned(self, source: EngineRuntime, target: EngineRuntime) -> None:
        """Traffic switched: waiting requests that named no engine follow it."""
        moving = [r for r in source.queue if r.params.engine is None and not r.internal]
        for request in moving:
            source.remove(request)
            request.engine = target.name
            target.queue.append(request)
        if moving:
            self.pump(target)

    def requeue_or_fail(self, engine: EngineRuntime, request: Request, cause: str) -> None:
        """A request whose worker died: retried once, elsewhere if possible, if nothing was streamed yet."""
        if request.internal:
            self._fail(request, ErrorCode.ENGINE_FAILED, f"worker {request.worker_id} {cause}")
            return
        if request.tokens_sent == 0 and request.attempts < 2 and not self.stopping:
            target = self._target_for(engine, request)
            if target is not None:
                request.dispatched_at = None
                request.engine = target.name
                target.queue.appendleft(request)
                log.warning("retrying request after worker exit", request_id=request.id, engine=target.name, cause=cause)
                self.events.publish(ev.TOPIC_REQUEST_RETRY, request_id=request.id, from_worker=request.worker_id, engine=target.name, cause=cause)
                self.pump(target)
                return
        self._fail(
            request,
            ErrorCode.ENGINE_FAILED,
            f"worker {request.worker_id} {cause} after {request.tokens_sent} tokens",
            usage={"prompt_tokens": None, "completion_tokens": request.tokens_sent},
        )

    def _target_for(self, engine: EngineRuntime, request: Request) -> EngineRuntime | None:
        """Where a request leaving ``engine`` can go: its pinned engine if that still
        serves, else (unpinned) the engine that takes traffic now."""
        if request.params.engine is not None:
            return engine if engine.refusal is None else None
        return self.supervisor.target_for_unpinned()

    def reroute_queue(self, engine: EngineRuntime) -> None:
        """An engine that cannot serve hands its waiting requests on, or refuses them."""
        refusal = engine.refusal or (ErrorCode.ENGINE_UNAVAILABLE, "engine cannot serve")
        while engine.queue:
            request = engine.queue.popleft()
            target = self._target_for(engine, request)
            if target is None or target is engine:
                self._fail(request, *refusal)
            else:
                request.engine = target.name
                target.queue.append(request)
                self.supervisor.ensure_started(target, "requests moved here")
                self.pump(target)

    # --- workers -------------------------------------------------------------

    def _on_worker_frames(self, frames: list[bytes]) -> None:
        worker_id_raw, payload = frames[0], frames[-1]
        if payload.startswith(p.TOKEN_FRAME_START) and self._forward_token_frame(worker_id_raw, payload):
            return
        try:
            # Heartbeats come from the worker's watchdog socket; both sockets are the one worker.
            worker_id = worker_id_raw.decode("utf-8", "replace").removesuffix(p.WATCHDOG_SUFFIX)
            self._on_worker_message(worker_id, p.decode(payload))
        except p.DecodeError as exc:
            log.error("undecodable message from a worker", worker_id=worker_id_raw, error=str(exc))
        except Exception:
            log.exception("internal error handling a worker message")

    def _forward_token_frame(self, worker_id_raw: bytes, payload: bytes) -> bool:
        """The token fast path: a token of the running request, in the form the
        worker runtime writes, is forwarded without decoding.  False: take the
        general path."""
        slot = self._slots_by_worker.get(worker_id_raw.decode("utf-8", "replace"))
        request = slot.current if slot is not None else None
        prefix = request.worker_token_prefix if request is not None else b"-"
        if not (payload.startswith(prefix) and payload.endswith(b'"}') and payload[len(prefix) : len(prefix) + 1] == b'"'):
            return False
        now = time.monotonic()
        slot.last_heard = now  # type: ignore[union-attr]
        self._on_token(request, payload[len(prefix) : -1], now)  # type: ignore[arg-type]
        return True

    def _on_worker_message(self, worker_id: str, message: dict[str, Any]) -> None:
        slot = self._slots_by_worker.get(worker_id) or self._claim(worker_id)
        if slot is None:
            # A worker from an earlier generation: it has no business here.
            self.send_worker(worker_id, {"type": p.S_SHUTDOWN})
            return
        now = time.monotonic()
        slot.last_heard = now
        kind = message.get("type")
        if kind == p.W_HEARTBEAT:
            slot.heartbeat = message
        elif kind == p.W_HELLO:
            slot.last_progress_at = now
            self._on_hello(slot, message)
        elif kind == p.W_LOADING:
            slot.load_progress, slot.last_progress_at = message.get("progress"), now
            log.info("loading", engine=slot.engine_name, worker_id=worker_id, progress=slot.load_progress, detail=message.get("message"))
        elif kind == p.W_READY:
            slot.model = message.get("model", {})
            slot.ready_at = now
            slot.set_state(SlotState.READY, "model loaded")
            self.supervisor.on_ready(slot)
            self.pump(self.engines[slot.engine_name])
        elif kind == p.W_LOAD_FAILED:
            slot.load_failure = {k: message.get(k) for k in ("code", "message", "exit_code")}
            log.error("worker could not load", engine=slot.engine_name, worker_id=worker_id, **slot.load_failure)
        elif kind in (p.W_TOKEN, p.W_DONE, p.W_ERROR):
            self._on_request_event(slot, kind, message, now)
        else:
            log.error("unknown message type from a worker", worker_id=worker_id, type=kind)

    def _claim(self, worker_id: str) -> WorkerSlot | None:
        """Map a worker id to the slot that spawned it, on its first message."""
        for engine in self.engines.values():
            slot = engine.slot
            if slot.worker_id == worker_id and slot.process is not None:
                self._slots_by_worker = {k: v for k, v in self._slots_by_worker.items() if v is not slot}
                self._slots_by_worker[worker_id] = slot
                return slot
        return None

    def _on_hello(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        slot.hello = message
        log.info("worker hello", engine=slot.engine_name, worker_id=slot.worker_id, pid=message.get("pid"), packages=message.get("packages"))
        if slot.state is not SlotState.SPAWNING:
            return
        slot.set_state(SlotState.LOADING, "hello received")
        engine = self.engines[slot.engine_name]
        config = engine.config
        spec = {
            "model": engine.model_path,
            "n_ctx": config.n_ctx,
            "n_threads": config.n_threads,
            "n_gpu_layers": config.n_gpu_layers,
            "chat_format": config.chat_format,
            "options": config.options,
        }
        slot.send({"type": p.S_LOAD, "protocol": p.PROTOCOL_VERSION, "spec": spec})

    def _on_request_event(self, slot: WorkerSlot, kind: str, message: dict[str, Any], now: float) -> None:
        request = slot.current
        if request is None or request.wire_id != message.get("request_id"):
            return  # the end of a request already retried elsewhere
        if kind == p.W_TOKEN:
            text = message.get("text")
            self._on_token(request, p.encode_string(text if isinstance(text, str) else ""), now)
            return
        slot.current = None
        engine = self.engines[slot.engine_name]
        if kind == p.W_DONE:
            if not request.finished and request.first_token_at is not None and request.dispatched_at is not None:
                engine.latency.record(now, (request.first_token_at - request.dispatched_at) * 1000, (now - request.first_token_at) * 1000, request.tokens_sent)
            self._done(request, message.get("finish_reason", p.FINISH_STOP), message.get("usage", {}), message.get("timings", {}))
        else:
            self._fail(request, message.get("code", ErrorCode.INTERNAL), message.get("message", "worker error"))
        slot.probe_due_at = now + self.settings.supervision.probe_interval_s
        self.pump(engine)

    def _on_token(self, request: Request, text_literal: bytes, now: float) -> None:
        """One token of the running request; ``text_literal`` is its text as a JSON string literal."""
        request.last_token_at = now
        if request.finished:
            return
        request.tokens_sent += 1
        if request.first_token_at is None:
            request.first_token_at = now
        if request.internal:
            return
        if request.params.stream:
            event = b"%s%s,\"index\":%d}" % (request.token_event_prefix, text_literal, request.tokens_sent - 1)
            self._send_client(request.envelope, event)
        else:
            request.text.append(json.loads(text_literal))

    async def _watch_loop(self) -> None:
        while True:
            self.supervisor.tick(time.monotonic())
            await asyncio.sleep(min(self.settings.heartbeat_interval_s, 0.25))

    def send_worker(self, worker_id: str, message: dict[str, Any]) -> None:
        # Not connected yet, or already gone: the exit watcher handles the latter.
        error = send_now(self.workers, [worker_id.encode(), p.encode(message)], self.worker_reader)
        if error is not None:
            log.debug("worker unreachable", worker_id=worker_id, error=str(error))

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
        self._terminal(request, event)

    def _fail(self, request: Request, code: str, message: str, usage: dict[str, Any] | None = None) -> None:
        if not request.finish():
            return
        event: dict[str, Any] = {"id": request.id, "event": p.EVENT_ERROR, "code": code, "message": message}
        event.update(engine=request.engine or None, worker=request.worker_id, timings=request.timings(time.monotonic()))
        if usage is not None:
            event["usage"] = usage
        self._terminal(request, event)

    def _terminal(self, request: Request, event: dict[str, Any]) -> None:
        ok = event["event"] == p.EVENT_DONE
        if request.internal:
            self.supervisor.on_probe_end(request, ok, event.get("message", ""))
            return
        engine = self.engines.get(request.engine)
        if engine is not None:
            if ok:
                engine.served += 1
            else:
                engine.failed += 1
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
        self._send_client(envelope, p.encode(event))

    def _send_client(self, envelope: list[bytes], frame: bytes) -> None:
        error = send_now(self.clients, [*envelope, frame], self.client_reader)
        if error is not None:
            # Disconnected (ROUTER_MANDATORY: peer unknown), or CLIENT_BACKLOG_LIMIT
            # events behind: either way nobody reads what follows.
            log.warning("client unreachable; cancelling its requests", error=str(error))
            self._client_gone(b"".join(envelope))

    def _client_gone(self, client: bytes) -> None:
        """Nobody will read the answers: stop spending compute on them."""
        for request in [r for r in self.requests.values() if r.client == client]:
            request.finish()
            self.requests.pop(request.key, None)
            engine = self.engines[request.engine]
            if not engine.remove(request) and engine.slot.current is request:
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
                "events_endpoint": self.settings.events_endpoint,
                "state_dir": str(self.settings.state_dir),
                "stopping": self.stopping,
                "active_engine": self.supervisor.switch.active,
                "requests_in_progress": len(self.requests),
            },
            "engines": [engine.describe(now) for engine in sorted(self.engines.values(), key=lambda e: e.config.priority)],
        }

