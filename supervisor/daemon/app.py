"""The composition root: builds the sockets, the core and the processes, wires
them, runs the loop and shuts down in order.

:class:`Daemon` is the one implementation of the core's Effects: every
decision the router and the supervisor take reaches a process or a socket
through the methods below, and nothing in the core calls back into here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import date
from pathlib import Path
from typing import Any

import zmq

from workers.protocol import ErrorCode
from workers.protocol.messages import Message, Shutdown

from ..config import Settings, split_listen
from ..config.discovery import scan
from ..core.effects import TOPIC_WORKER_STATE, WorkerLaunch
from ..core.engines import Engines, EngineState
from ..core.lifecycle import Worker, WorkerState
from ..core.policy import LatencySwitch
from ..core.router import Router
from ..core.supervision import Supervision
from ..core.errors import Refused
from ..node.envs import env_dir, env_is_current, env_python, worker_environ
from ..io.client_front import ClientFront
from ..io.events import EventPublisher
from ..io.memory import fix_mmap_threshold
from ..io.metrics import MetricsExporter, NodeCollector
from ..io.metrics_server import MetricsServer
from ..planning.measure.inputs import STATUS_SNAPSHOT_AGE_S, Planning
from ..io.sd_notify import Notifier
from ..planning.decide.types import Plan
from ..planning.measure.gpu import cpu_only_build_on_gpu_node
from ..planning.measure.recorded_gpu import recorded_probe
from ..io.access import CLIENTS_DOMAIN, WORKERS_DOMAIN, LocalAccess
from ..io.worker_link import WorkerLink
from ..io.worker_process import WorkerProcess, worker_command
from ..logs import get_logger
from ..node.models import model_label, model_variants_for
from .notices import ServiceNotices
from .preflight import remove_socket_files
from .reloading import reload_config
from .status import daemon_status, models_listing

log = get_logger("supervisor.daemon")

CLIENT_BACKLOG_LIMIT = 100_000  # events queued for one client before it counts as gone
TICK_S = 0.25  # the supervisor's periodic look, at the latest
WAKE_MARGIN_S = 0.002
RECORDED_GPU_ENV = "NODESUP_TEST_GPU"


def bind_client_socket(access: LocalAccess, settings: Settings) -> zmq.Socket:
    """The client socket, bound before anything else: it answers while the daemon prepares (run.py)."""
    limit = settings.max_message_bytes
    assert settings.client_endpoint
    return access.bind(
        zmq.ROUTER,
        settings.client_endpoint,
        {
            zmq.ROUTER_MANDATORY: 1,  # a vanished client raises instead of dropping silently
            # Frames up to 4x the limit still get a proper message_too_large reply;
            # beyond that libzmq drops the connection before the frame is read.
            zmq.MAXMSGSIZE: max(4 * limit, 16 << 20),
            zmq.SNDHWM: CLIENT_BACKLOG_LIMIT,  # a client this far behind counts as gone
        },
        CLIENTS_DOMAIN,
    )


class Daemon:
    def __init__(
        self,
        settings: Settings,
        context: zmq.Context | None = None,
        access: LocalAccess | None = None,
        client_socket: zmq.Socket | None = None,
    ) -> None:
        """``context``, ``access`` and ``client_socket``: those the start-up made (bound already), else made here."""
        self.settings = settings
        self.started_at = time.monotonic()
        self.context = context or zmq.Context()
        self.processes: dict[str, WorkerProcess] = {}
        self._stop = asyncio.Event()
        # Before any bind: run directory, CURVE keys, ZAP handler.
        self.access = access or LocalAccess(settings, self.context)
        self._environ = worker_environ(settings)
        recorded = os.environ.get(RECORDED_GPU_ENV)  # a test's recorded GPU (planning/measure/recorded_gpu.py)
        self.planning = (
            Planning(settings, recorded_probe(Path(recorded), self._worker_devices)) if recorded else Planning(settings)
        )
        fix_mmap_threshold()  # a large frame's memory is unmapped when freed (io/memory.py)
        self.client_socket = client_socket or bind_client_socket(self.access, settings)
        self._bind()
        supervision = settings.supervision
        self.engines = Engines({name: self.engine_state(name) for name in settings.engines}, self, settings.gpu)
        self.switch = LatencySwitch(
            min_dwell_s=supervision.switch_min_dwell_s, breach_for_s=supervision.switch_breach_for_s
        )
        self.router = Router(self.engines, self.switch, self, supervision.probe_interval_s)
        self.supervisor = Supervision(self.engines, self.router, self.switch, settings, self)
        self.router.on_probe_end = self.supervisor.judge_probe
        self.router.on_budget_spent = self.supervisor.budgets.spent
        self.notices = ServiceNotices(
            Notifier(), self.engines, self.router, ready_when_bound=settings.systemd_ready == "bound"
        )
        self.clients = ClientFront(
            self.client_socket,
            self.router,
            self.status,
            self.reload,
            settings.max_message_bytes,
            settings.max_tokens_limit,
            self.models,
        )
        self.workers = WorkerLink(self.worker_socket, self.supervisor, self.router, self.publish)
        # The Prometheus exposition: served on [metrics] listen, and by an HTTP front through render().
        self.metrics = MetricsExporter(NodeCollector(self.engines, self.planning, self.processes))
        self.metrics_server: MetricsServer | None = None
        self.metrics_url: str | None = None
        self.http = self._http_front() if settings.http.listen else None

    def _http_front(self) -> Any:
        """The OpenAI-compatible HTTP front, a client of the client front (docs/HTTP.md)."""
        from ..io.http.access import load_api_keys
        from ..io.http.front import HttpFront, OpenAIRoutes  # starlette and uvicorn load only when it is on

        settings = self.settings
        keys = load_api_keys(settings.http, warn=True)
        routes = OpenAIRoutes(
            self.clients, lambda: self.settings.engines, keys, settings.max_tokens_limit, settings.max_message_bytes
        )
        front = HttpFront(settings.http, routes, settings.shutdown_grace_s, [routes.metrics_route(self.metrics.render)])
        self.metrics.registry.register(front.collector())
        return front

    # --- building ------------------------------------------------------------------

    def _bind(self) -> None:
        """The worker and event sockets (the client socket is bound first); every option before its bind:
        libzmq gives later connections the options of bind time."""
        settings, limit = self.settings, self.settings.max_message_bytes
        assert settings.worker_endpoint and settings.events_endpoint
        self.worker_socket = self.access.bind(
            zmq.ROUTER,
            settings.worker_endpoint,
            {
                zmq.ROUTER_MANDATORY: 1,
                zmq.MAXMSGSIZE: max(4 * limit, 16 << 20),  # a worker's largest message is a token or a status
            },
            WORKERS_DOMAIN,
        )
        self.worker_endpoint = self.worker_socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._environ.update(self.access.worker_environ(self.worker_endpoint))
        self.events = EventPublisher(
            self.access.bind(
                zmq.XPUB,
                settings.events_endpoint,
                {
                    zmq.SNDHWM: 10_000,
                    zmq.XPUB_VERBOSE: 1,  # every subscription is told, not only a topic's first
                },
                CLIENTS_DOMAIN,
            )
        )

    def engine_state(self, name: str, settings: Settings | None = None) -> EngineState:
        """A configured engine's state, with what can be known before its worker starts
        (``settings``: a reload's new ones; else those in force)."""
        settings = settings or self.settings
        config = settings.engines[name]
        model = model_label(settings, config)
        engine = EngineState(name, config, model, settings.supervision, self._on_transition)
        if not env_is_current(settings, config.env_name, config.kind):
            engine.hard_failure = (
                ErrorCode.ENGINE_UNAVAILABLE,
                f"environment {config.env_name!r} is missing or stale; run: node-supervisor envs create {config.env_name}",
            )
        elif config.kind == "llamacpp" and not any(path.exists() for path in model_variants_for(settings, config)):
            # The circuit's probe looks again later: the file may appear.
            engine.breaker.trip(time.monotonic(), ErrorCode.MODEL_NOT_FOUND, f"model file not found: {model}")
        return engine

    def _on_transition(self, worker: Worker, old: WorkerState, new: WorkerState, reason: str) -> None:
        self.publish(
            TOPIC_WORKER_STATE,
            engine=worker.engine,
            worker_id=worker.worker_id,
            old=old.value,
            new=new.value,
            reason=reason,
        )

    # --- running and stopping ---------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """The one way to stop: signals, service stop and admin stop all end here."""
        if not self._stop.is_set():
            log.info("stop requested", reason=reason)
            self._stop.set()

    def reload(self, reason: str) -> dict[str, Any]:
        """Read the configuration again and apply it (daemon/reloading.py)."""
        self.settings, summary = reload_config(
            self.settings,
            self.supervisor,
            self.planning,
            self.engine_state,
            self.notices,
            reason,
        )
        self._log_models()
        return summary

    def _log_models(self) -> None:
        """What models_dir holds that cannot be served, and directories that cannot be read: logged, never fatal."""
        found, problems = scan(self.settings.model_dirs)
        for problem in problems:
            log.warning("models_dir cannot be read", detail=problem)
        for model in found:
            if not model.available:
                log.warning("model file cannot be served", path=model.path, reason=model.reason)

    def request_reload(self, reason: str) -> None:
        """From a signal handler: reload on the loop's next turn (a bad file is logged there)."""
        asyncio.get_running_loop().call_soon(self._reload_quietly, reason)

    def _reload_quietly(self, reason: str) -> None:
        try:
            self.reload(reason)
        except Refused:
            pass  # logged and published by the reload
        except Exception:
            log.exception("internal error reloading the configuration")

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.settings.metrics.listen is not None:  # first: a port in use stops the daemon before any worker starts
            self.metrics_server = MetricsServer(self.metrics, *split_listen(self.settings.metrics.listen))
            self.metrics_url = await self.metrics_server.start()
            log.info("metrics serving", url=self.metrics_url)
        self._log_models()
        self.supervisor.start(time.monotonic())
        self.clients.reader.start(self._loop)
        self.workers.reader.start(self._loop)
        assert self.events.reader is not None
        self.events.reader.start(self._loop)
        if self.http is not None:
            self.http.start()
        ticker = asyncio.ensure_future(self._tick_loop())
        log.info(
            "daemon serving",
            client_endpoint=self.settings.client_endpoint,
            events_endpoint=self.settings.events_endpoint,
            pid=os.getpid(),
            engines=list(self.engines.by_name),
        )
        await self._stop.wait()
        await self._shutdown()
        ticker.cancel()

    async def _tick_loop(self) -> None:
        while True:
            self._tick()
            await asyncio.sleep(min(self.settings.heartbeat_interval_s, TICK_S))

    def _tick(self) -> None:
        try:
            # The accounting day is the local date: daily budgets renew at local midnight.
            self.supervisor.tick(time.monotonic(), date.today().isoformat())
            self.notices.tick(time.monotonic())
        except Exception:  # a bug must not stop supervision
            log.exception("internal error in the supervisor's tick")

    async def _shutdown(self) -> None:
        """Queued requests end at once, running ones get the grace period, then workers are stopped."""
        self.engines.stopping = True
        self.notices.stopping()
        if self.http is not None:
            self.http.stop_accepting()
        now = time.monotonic()
        for engine in self.engines:
            while engine.queue:
                self.router.fail(engine.queue.popleft(), ErrorCode.SHUTTING_DOWN, "the daemon is stopping", now)
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self.router.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request in list(self.router.requests.values()):
            self.router.fail(request, ErrorCode.SHUTTING_DOWN, "the daemon is stopping", time.monotonic())
        if self.http is not None:
            await self.http.stopped()  # every request has ended: its answer is written, or the client went away
        for engine in self.engines:
            self.engines.stop(engine, "daemon stopping", time.monotonic())
        await asyncio.gather(*(self._reap(process) for process in list(self.processes.values())))
        if self.metrics_server is not None:
            await self.metrics_server.close()
        self.clients.reader.stop()
        self.workers.reader.stop()
        for sock in (self.client_socket, self.worker_socket):
            sock.close()
        self.events.close()
        self.access.close()
        self.context.term()
        remove_socket_files(self.settings)
        log.info("daemon stopped")

    async def _reap(self, process: WorkerProcess) -> None:
        """Shutdown message (sent by stop), grace, SIGTERM, grace, SIGKILL."""
        if await process.wait_exit(self.settings.shutdown_grace_s):
            return
        log.warning("worker did not exit in time; terminating", worker_id=process.worker_id, pid=process.pid)
        process.kill(2.0)
        if not await process.wait_exit(5.0):
            log.error("worker did not exit after SIGKILL", worker_id=process.worker_id, pid=process.pid)

    # --- Effects --------------------------------------------------------------------

    def start_worker(self, launch: WorkerLaunch) -> None:
        python = env_python(env_dir(self.settings, launch.env_name))
        command = worker_command(
            python, launch, self.worker_endpoint, self.settings.heartbeat_interval_s, self.settings.log_level
        )
        process = WorkerProcess(launch, command, self._environ, self._on_worker_exit)
        self.processes[launch.worker_id] = process
        self.workers.admit(launch.worker_id, process.routing_id, self.engines[launch.engine])
        asyncio.ensure_future(process.run())

    def _on_worker_exit(self, worker_id: str, returncode: int | None, info: dict[str, Any]) -> None:
        self.processes.pop(worker_id, None)
        self.workers.forget(worker_id)
        try:
            self.supervisor.on_exit(worker_id, returncode, info, time.monotonic())
        except Exception:
            log.exception("internal error handling a worker exit", worker_id=worker_id)

    def stop_worker(self, worker_id: str, connected: bool) -> None:
        if connected:
            self.workers.send(worker_id, Shutdown())
        elif (process := self.processes.get(worker_id)) is not None:
            process.signal(signal.SIGTERM)  # not connected yet, a message could not reach it

    def kill_worker(self, worker_id: str, grace_s: float) -> None:
        process = self.processes.get(worker_id)
        if process is not None:
            process.kill(grace_s)

    def send_worker(self, worker_id: str, message: Message) -> None:
        self.workers.send(worker_id, message)

    def send_heartbeat(self, worker_id: str) -> None:
        self.workers.send_heartbeat(worker_id)

    def send_client(self, envelope: list[bytes], frame: bytes) -> bool:
        return self.clients.send(envelope, frame)

    def publish(self, topic: str, **fields: Any) -> None:
        self.events.publish(topic, **fields)

    def wake_at(self, when: float) -> None:
        # asyncio runs a timer up to its clock resolution early: a little after, never before.
        self._loop.call_at(max(when, self._loop.time()) + WAKE_MARGIN_S, self._tick)

    def model_present(self, path: str) -> bool:
        return Path(path).exists()

    def build_warning(self, kind: str, versions: dict[str, Any]) -> str | None:
        if kind != "llamacpp":
            return None
        return cpu_only_build_on_gpu_node(versions, self.planning.snapshot(STATUS_SNAPSHOT_AGE_S))

    def plan_load(self, engine: str, previous: Plan | None, after_oom: bool) -> Plan | None:
        try:
            return self.planning.plan_load(self.engines[engine], previous, after_oom, self._own_pids(engine))
        except Exception:  # a planning bug must not keep an engine from starting: it loads as configured
            log.exception("planning failed; loading as configured", engine=engine)
            return None

    def gpu_room(self) -> Any:
        try:
            return self.planning.room()
        except Exception:  # a measuring bug must not keep an engine from starting: it loads as planned
            log.exception("measuring the GPUs failed; loading without placement")
            return None

    def _worker_devices(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """(engine, pid, devices) of each live worker: what a recorded GPU counts as held."""
        return [
            (p.launch.engine, p.pid, p.launch.devices or (0,)) for p in self.processes.values() if p.pid is not None
        ]

    def _own_pids(self, engine: str) -> frozenset[int]:
        """The engine's worker processes still alive (a restart reuses their GPU memory once they exit)."""
        return frozenset(p.pid for p in self.processes.values() if p.launch.engine == engine and p.pid is not None)

    def models(self) -> dict[str, Any]:
        return models_listing(self.settings, self.supervisor, self.planning, self.processes)

    def status(self) -> dict[str, Any]:
        return daemon_status(
            self.settings, self.supervisor, self.planning, self.processes, self.started_at, self.metrics_url
        )
