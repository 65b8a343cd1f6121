"""Drive the core in-process: a recording fake of Effects and a manual clock.

No process, socket or event loop: what the router and the supervisor decide
is read from the effects they asked for, in order.
"""

from __future__ import annotations

import json
from typing import Any

from supervisor.config import load_settings
from supervisor.core.effects import WorkerLaunch
from supervisor.core.engines import Engines, EngineState
from supervisor.core.policy import LatencySwitch
from supervisor.core.reload import ReloadChanges, apply_reload, compare, effective_settings
from supervisor.core.router import Router
from supervisor.core.supervision import Supervision
from supervisor.core.validate import parse_generate
from workers import protocol as p
from workers.protocol.messages import Done, Hello, Message, Ready, Usage


class RecordingEffects:
    """Every effect the core asks for, as (name, details) in order; clients and models can be scripted."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.launches: list[WorkerLaunch] = []
        self.refusing_clients: set[bytes] = set()  # clients whose sends fail (gone, too far behind)
        self.missing_models: set[str] = set()
        self.planners: dict[str, Any] = {}  # engine -> (previous plan, after_oom) -> plan: how a test's GPU looks
        self.room: Any = None  # placement.GpuRoom the GPUs measure now (None: no GPU), or a function returning one

    def start_worker(self, launch: WorkerLaunch) -> None:
        self.calls.append(("start", launch.worker_id))
        self.launches.append(launch)

    def stop_worker(self, worker_id: str, connected: bool) -> None:
        self.calls.append(("stop", worker_id))

    def kill_worker(self, worker_id: str, grace_s: float) -> None:
        self.calls.append(("kill", worker_id))

    def send_worker(self, worker_id: str, message: Message) -> None:
        self.calls.append(("worker", (worker_id, message.to_wire())))  # recorded as it goes on the wire

    def send_heartbeat(self, worker_id: str) -> None:
        self.calls.append(("heartbeat", worker_id))

    def send_client(self, envelope: list[bytes], frame: bytes) -> bool:
        client = b"".join(envelope)
        if client in self.refusing_clients:
            self.calls.append(("client_refused", client))
            return False
        self.calls.append(("client", (client, json.loads(frame))))
        return True

    def publish(self, topic: str, **fields: Any) -> None:
        self.calls.append(("publish", (topic, fields)))

    def wake_at(self, when: float) -> None:
        self.calls.append(("wake_at", when))

    def model_present(self, path: str) -> bool:
        return path not in self.missing_models

    def build_warning(self, kind: str, versions: dict[str, Any]) -> str | None:
        return None

    def plan_load(self, engine: str, previous: Any, after_oom: bool) -> Any:
        self.calls.append(("plan", (engine, after_oom)))
        planner = self.planners.get(engine)
        return planner(previous, after_oom) if planner else None

    def gpu_room(self) -> Any:
        return self.room() if callable(self.room) else self.room

    # --- reading what happened ---------------------------------------------------

    def named(self, name: str) -> list[Any]:
        return [details for kind, details in self.calls if kind == name]

    def client_events(self, client: bytes = b"c") -> list[dict[str, Any]]:
        return [event for who, event in self.named("client") if who == client]

    def worker_messages(self, worker_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [m for w, m in self.named("worker") if w == worker_id and (kind is None or m.get("type") == kind)]

    def topics(self, topic: str) -> list[dict[str, Any]]:
        return [fields for t, fields in self.named("publish") if t == topic]


class Core:
    """The router and the supervisor over configured engines, with a clock the test moves."""

    def __init__(self, engines: dict[str, dict[str, Any]], **settings: Any) -> None:
        base = {"state_dir": "/nonexistent/state", "models_dir": [], "engines": engines}
        self.settings = load_settings(None, {**base, **settings})
        self.effects = RecordingEffects()
        self.now = 1000.0
        states = {
            name: EngineState(name, config, f"/models/{name}.gguf", self.settings.supervision, lambda *_: None)
            for name, config in self.settings.engines.items()
        }
        self.engines = Engines(states, self.effects, self.settings.gpu)
        self.switch = LatencySwitch(
            self.settings.supervision.switch_min_dwell_s, self.settings.supervision.switch_breach_for_s
        )
        self.router = Router(self.engines, self.switch, self.effects, self.settings.supervision.probe_interval_s)
        self.supervisor = Supervision(self.engines, self.router, self.switch, self.settings, self.effects)
        self.router.on_probe_end = self.supervisor.judge_probe
        self.router.on_budget_spent = self.supervisor.budgets.spent

    def reload(self, engines: dict[str, dict[str, Any]], **settings: Any) -> ReloadChanges:
        """Apply a new configuration as the daemon does (models at /models/<name>.gguf)."""
        new = load_settings(None, {"state_dir": "/nonexistent/state", "models_dir": [], "engines": engines, **settings})
        changes = compare(self.settings, new)
        self.settings = effective_settings(self.settings, new)
        fresh = lambda name: EngineState(
            name, self.settings.engines[name], f"/models/{name}.gguf", self.settings.supervision, lambda *_: None
        )  # noqa: E731
        apply_reload(self.supervisor, self.settings, changes, fresh, self.now)
        return changes

    def advance(self, seconds: float, day: str | None = None) -> None:
        """Move the clock and tick; ``day``: the date the daemon would pass (the accounting day)."""
        self.now += seconds
        self.supervisor.tick(self.now, day)

    def engine(self, name: str) -> EngineState:
        return self.engines[name]

    # --- a worker's side of the conversation ---------------------------------------

    def bring_up(self, name: str, capabilities: tuple[str, ...] = ()) -> str:
        """The engine's spawned worker says hello and loads: it is ready (able to do ``capabilities``)."""
        engine = self.engines[name]
        worker_id = engine.worker.worker_id
        self.supervisor.on_hello(
            engine, Hello(protocol=p.PROTOCOL_VERSION, engine="fake", worker_id=worker_id, pid=1), self.now
        )
        self.supervisor.on_ready(engine, Ready(capabilities=capabilities), self.now)
        return worker_id

    def current(self, name: str) -> Any:
        """What the engine's worker generates (the first, when it runs several), or None."""
        return next(iter(self.engines[name].worker.running.values()), None)

    def tokens(self, name: str, count: int, per_event: int = 1, wire_id: str | None = None) -> None:
        wire_id = wire_id or self.current(name).wire_id
        for _ in range(count):
            self.router.on_token(self.engines[name], wire_id, p.encode_string("x"), per_event, self.now)

    def finish_current(self, name: str, finish_reason: str = p.FINISH_STOP, wire_id: str | None = None) -> None:
        engine = self.engines[name]
        current = engine.worker.running[wire_id] if wire_id else self.current(name)
        assert current is not None, f"{name} runs nothing"
        message = Done(
            request_id=current.wire_id,
            finish_reason=finish_reason,
            usage=Usage(prompt_tokens=3, completion_tokens=current.tokens),
        )
        self.router.on_result(engine, message, self.now)

    def exit(self, name: str, returncode: int | None, cause: str = "") -> None:
        engine = self.engines[name]
        info = {
            "exit_code": returncode,
            "signal": None,
            "cause": cause or f"exited with code {returncode}",
            "last_lines": [],
        }
        self.supervisor.on_exit(engine.worker.worker_id, returncode, info, self.now)

    # --- a client's side ---------------------------------------------------------

    def submit(self, rid: str, client: bytes = b"c", **fields: Any) -> None:
        message = {"op": "generate", "id": rid, "prompt": "hi", **fields}
        self.router.submit([client], rid, parse_generate(message, 8192), self.now)

    def terminal(self, rid: str, client: bytes = b"c") -> list[dict[str, Any]]:
        return [e for e in self.effects.client_events(client) if e.get("id") == rid and e["event"] in ("done", "error")]


def hello(pid: int) -> Hello:
    """A worker's hello, as the runtime sends it."""
    return Hello(protocol=p.PROTOCOL_VERSION, engine="fake", worker_id=f"w{pid}", pid=pid)
