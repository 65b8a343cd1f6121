"""Keeping workers alive: what their messages and exits mean, hangs, restarts,
circuit breakers, probes and the choice of engine.  Pure: every entry point
takes ``now``; the decisions in policy.py say when, this module says what
follows, and the effects happen through Effects.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from typing import Any

from workers import protocol as p
from workers.protocol import ErrorCode
from workers.protocol.messages import (
    PHASE_EMBEDDING,
    Failed,
    Heartbeat,
    Hello,
    Load,
    LoadFailed,
    Loading,
    Ready,
    Sampling,
)

from ..config import Settings
from ..logs import get_logger
from .budget import DailyBudgets
from .effects import (
    Effects,
    TOPIC_ENGINE_CIRCUIT,
    TOPIC_ENGINE_SWITCH,
    TOPIC_ENGINE_UNLOAD,
    TOPIC_PROBE,
    TOPIC_WORKER_EXIT,
    TOPIC_WORKER_HANG,
)
from .engines import Engines, EngineState
from .lifecycle import WorkerState
from .policy import Circuit, LatencySwitch, retry_after, retry_can_help
from .request import Probe
from .router import Router
from .stats import restart_cause
from .validate import GenerateParams

log = get_logger("supervisor.supervisor")

# A liveness probe: one greedy token.
PROBE_SAMPLING = Sampling(max_tokens=1, temperature=0.0, top_p=1.0, top_k=1, seed=0)


class Supervision:
    def __init__(
        self, engines: Engines, router: Router, switch: LatencySwitch, settings: Settings, effects: Effects
    ) -> None:
        self.engines = engines
        self.router = router
        self.switch = switch
        self.settings = settings
        self.config = settings.supervision
        self.effects = effects
        self._probe_ids = itertools.count(1)
        self.budgets = DailyBudgets(engines, router, effects)

    def reconfigure(self, settings: Settings) -> None:
        """A reload's supervision settings, from now on."""
        self.settings, self.config = settings, settings.supervision
        self.router.probe_interval_s = self.config.probe_interval_s
        self.engines.gpu = settings.gpu
        self.switch.min_dwell_s, self.switch.breach_for_s = (
            self.config.switch_min_dwell_s,
            self.config.switch_breach_for_s,
        )
        for engine in self.engines:
            engine.apply_supervision(self.config)

    def start(self, now: float) -> None:
        for engine in self.engines:
            if engine.refusal is not None:
                log.error("engine cannot serve", engine=engine.name, code=engine.refusal[0], reason=engine.refusal[1])
            elif engine.config.standby == "warm":
                self.engines.start(engine, "daemon start", now, "warm")
        self.route(now)

    # --- what workers say --------------------------------------------------------------

    def on_hello(self, engine: EngineState, message: Hello, now: float) -> None:
        worker = engine.worker
        worker.report.hello = message
        worker.times.last_progress_at = now
        log.info(
            "worker hello",
            engine=engine.name,
            worker_id=worker.worker_id,
            pid=message.pid,
            packages=message.packages,
        )
        warning = self.effects.build_warning(engine.config.kind, message.versions)
        engine.build_warnings = [warning] if warning else []
        if warning:
            log.warning("engine build cannot use this node's GPU", engine=engine.name, warning=warning)
        if worker.state is not WorkerState.SPAWNING:
            return
        worker.transition(WorkerState.LOADING, "hello received")
        self.effects.send_worker(worker.worker_id, Load(protocol=p.PROTOCOL_VERSION, spec=engine.load_spec()))

    def on_loading(self, engine: EngineState, message: Loading, now: float) -> None:
        worker = engine.worker
        worker.report.load_progress, worker.times.last_progress_at = message.progress, now
        log.info(
            "loading",
            engine=engine.name,
            worker_id=worker.worker_id,
            progress=worker.report.load_progress,
            detail=message.message,
        )

    def on_ready(self, engine: EngineState, message: Ready, now: float) -> None:
        worker = engine.worker
        if worker.state is not WorkerState.LOADING:
            return  # a stop was asked meanwhile
        worker.report.model = message.model
        worker.slots = message.slots if 1 <= message.slots <= p.MAX_SLOTS else 1
        engine.capabilities = frozenset(message.capabilities)
        worker.times.ready_at = now
        worker.times.probe_due_at = now + self.config.probe_interval_s
        worker.transition(WorkerState.READY, "model loaded")
        engine.residency.record_load_time(now - (worker.times.started_at or now))
        if engine.breaker.record_success():
            log.info("circuit closed", engine=engine.name)
            self.effects.publish(
                TOPIC_ENGINE_CIRCUIT, engine=engine.name, state=Circuit.CLOSED.value, code=None, reason="worker ready"
            )
        self.route(now)
        self.router.pump(engine, now)
        self.engines.unload_if_idle(engine, now)  # loaded by a load op with nothing to run, keep_alive 0
        self.engines.gpu_released(now)  # loads on a GPU are serialized: the next may go

    def on_load_failed(self, engine: EngineState, message: LoadFailed, now: float) -> None:
        engine.worker.report.load_failure = message
        log.error("worker could not load", engine=engine.name, worker_id=engine.worker.worker_id, **asdict(message))

    def on_failed(self, engine: EngineState, message: Failed, now: float) -> None:
        """The engine cannot go on (a remote engine's upstream failed); its exit, a crash, follows."""
        engine.worker.report.failure = message
        log.error(
            "worker cannot go on serving", engine=engine.name, worker_id=engine.worker.worker_id, **asdict(message)
        )

    def on_heartbeat(self, engine: EngineState, message: Heartbeat, now: float) -> None:
        engine.worker.report.heartbeat = message
        if message.phase == PHASE_EMBEDDING and message.last_token_age_ms is not None:
            # An embed op streams no tokens: its decodes' progress is what shows it is not stalled.
            for generation in engine.worker.running.values():
                if generation.params.input is not None:
                    generation.last_token_at = max(
                        generation.last_token_at or 0.0, now - message.last_token_age_ms / 1000
                    )

    def heard_from(self, engine: EngineState, now: float) -> None:
        engine.worker.times.last_heard = now

    # --- exits ----------------------------------------------------------------------------

    def on_exit(self, worker_id: str, returncode: int | None, exit_info: dict[str, Any], now: float) -> None:
        """A worker process ended, for whatever reason; ``exit_info`` describes how."""
        engine = self.engines.owning(worker_id)
        if engine is None:
            return
        worker = engine.worker
        lost, worker.running = list(worker.running.values()), {}
        worker.alive = False
        if worker.hang_reason:
            exit_info = {**exit_info, "cause": f"hung ({worker.hang_reason}); {exit_info['cause']}"}
        worker.last_exit = exit_info
        cause = exit_info["cause"]
        intended = worker.state is WorkerState.STOPPING or self.engines.stopping
        self._report_exit(engine, exit_info, intended)
        if not intended and worker.state is WorkerState.READY:
            engine.residency.count_unload("failed")
            self.effects.publish(
                TOPIC_ENGINE_UNLOAD, engine=engine.name, worker_id=worker.worker_id, reason="failed", detail=cause
            )
        if intended:
            if worker.state is WorkerState.STOPPING:
                worker.transition(WorkerState.STOPPED, cause)
        elif not retry_can_help(returncode):
            failure = worker.report.load_failure
            reason = f"{failure.message if failure else cause} (exit code {returncode})"
            worker.transition(WorkerState.FAILED, reason)
            engine.hard_failure = (ErrorCode.ENGINE_UNAVAILABLE, reason)
        else:
            self._after_failure(engine, returncode, cause, now)
        for generation in reversed(lost):  # retries go in front: the first dispatched ends up first
            if not generation.finished:
                self.router.worker_lost(engine, generation, cause, now)
        if engine.reload_pending or engine.retired:
            self.engines.drained(engine, now)
        elif intended and engine.queue and not self.engines.stopping:
            self.engines.ensure_running(engine, "requests arrived while it was unloading", now)
        if engine.refusal is not None:
            self.router.reroute_queue(engine, now)
        self.route(now)
        self.engines.gpu_released(now)

    def _report_exit(self, engine: EngineState, exit_info: dict[str, Any], intended: bool) -> None:
        worker = engine.worker
        fields = {k: exit_info.get(k) for k in ("exit_code", "signal", "cause", "last_lines")}
        (log.info if intended else log.error)("worker exited", engine=engine.name, worker_id=worker.worker_id, **fields)
        self.effects.publish(
            TOPIC_WORKER_EXIT, engine=engine.name, worker_id=worker.worker_id, intended=intended, **fields
        )

    def _after_failure(self, engine: EngineState, returncode: int | None, cause: str, now: float) -> None:
        """An unexpected exit: back off and restart, or open the circuit."""
        report = engine.worker.report
        failure = report.load_failure or report.failure
        code = failure.code if failure else ErrorCode.ENGINE_FAILED
        reason = failure.message if failure else cause
        engine.stats.record_restart(restart_cause(engine.worker.kill_cause, report.load_failure))
        if code == ErrorCode.GPU_OUT_OF_MEMORY and engine.plan is not None:
            # A planned step, not a crash: the next plan never repeats this choice, so it cannot loop.
            engine.oom_step = True
            engine.worker.times.restart_at = now
            engine.worker.transition(WorkerState.BACKOFF, f"out of GPU memory ({reason}); planning a smaller load")
            self.effects.wake_at(now)
            return
        if returncode == p.ExitCode.MODEL_ERROR:
            engine.breaker.trip(now, code, reason)  # the same file fails the same way: no point counting
            opened = True
        else:
            opened = engine.breaker.record_failure(now, code, reason)
        engine.worker.restarts += 1
        if opened:
            engine.worker.transition(
                WorkerState.BACKOFF, f"circuit open: {reason}; probe in {engine.breaker.open_s:.0f}s"
            )
            log.error("circuit open", engine=engine.name, reason=reason)
            self.effects.publish(
                TOPIC_ENGINE_CIRCUIT, engine=engine.name, state=Circuit.OPEN.value, code=code, reason=reason
            )
            return
        delay = max(
            engine.backoff.next_delay(engine.worker.times.ready_at, now),
            retry_after(failure.retry_after_s if failure else None),
        )
        engine.worker.times.restart_at = now + delay
        engine.worker.transition(WorkerState.BACKOFF, f"{cause}; restarting in {delay:.1f}s")
        self.effects.wake_at(now + delay)

    # --- routing -------------------------------------------------------------------

    def route(self, now: float) -> None:
        """Re-evaluate which engine takes unpinned traffic; move waiting requests if it changed."""
        engines = list(self.engines)
        # A cold engine is the standby for when every warm engine is refused
        # (failed, circuit open), not for a warm engine that is merely starting.
        warm_all_refused = all(e.refusal is not None for e in engines if e.config.standby == "warm")
        healthy = {e.name for e in engines if e.healthy and (e.worker.state is WorkerState.READY or warm_all_refused)}
        verdicts = {e.name: e.verdict(now, self.config) for e in engines}
        previous = self.switch.active
        active, why = self.switch.decide(now, [e.name for e in self.engines.by_priority()], healthy, verdicts)
        if active is None or active == previous:
            return
        if previous is None:  # the first choice at start, not a switch away from anything
            log.info("traffic goes to", engine=active, reason=why)
        else:
            log.warning("engine switch", from_engine=previous, to_engine=active, reason=why)
        self.effects.publish(TOPIC_ENGINE_SWITCH, **{"from": previous, "to": active, "reason": why})
        target = self.engines[active]
        if not target.on_demand:  # a model loaded on demand waits for a request (moved ones below load it)
            self.engines.ensure_running(target, f"traffic switched here: {why}", now)
        source = self.engines.get(previous)
        if source is not None:
            self.router.move_unpinned(source, target, now)

    # --- the periodic look at every worker ------------------------------------------------

    def tick(self, now: float, day: str | None = None) -> None:
        """The periodic look; ``day``: the daemon's date (the accounting day), when it tells it."""
        if day is not None:
            self.budgets.turn_day(day, now)
        self.router.expire(now)
        for engine in self.engines:
            worker = engine.worker
            if worker.alive:
                if now - worker.times.heartbeat_sent_at >= self.settings.heartbeat_interval_s:
                    worker.times.heartbeat_sent_at = now
                    self.effects.send_heartbeat(worker.worker_id)
                self._check_hang(engine, now)
            self._maybe_restart(engine, now)
            self._maybe_probe_circuit(engine, now)
            self._maybe_probe_liveness(engine, now)
            self.engines.unload_if_idle(engine, now)
        self.engines.retry_waiting(now)
        self.engines.check_neighbours(now)
        self.route(now)

    def _maybe_restart(self, engine: EngineState, now: float) -> None:
        times = engine.worker.times
        if engine.worker.state is WorkerState.BACKOFF and times.restart_at is not None and now >= times.restart_at:
            times.restart_at = None
            if engine.breaker.state is Circuit.CLOSED:
                self.engines.start(engine, "restart after backoff", now, "restart")

    def _check_hang(self, engine: EngineState, now: float) -> None:
        reason = self._hang_reason(engine, now)
        worker = engine.worker
        if reason is not None and worker.hang_reason is None:
            log.error("worker hung; killing it", engine=engine.name, worker_id=worker.worker_id, reason=reason)
            self.effects.publish(TOPIC_WORKER_HANG, engine=engine.name, worker_id=worker.worker_id, reason=reason)
            self._kill(engine, reason, "hang")

    def _hang_reason(self, engine: EngineState, now: float) -> str | None:
        """Why this worker counts as hung now, if it does.  Slow is not dead: loading is judged by its own progress."""
        worker, times, config = engine.worker, engine.worker.times, self.config
        silent = now - (times.last_heard or now)
        if worker.state is WorkerState.STOPPING:
            if now - (times.stop_requested_at or now) > self.settings.shutdown_grace_s:
                return f"still running {self.settings.shutdown_grace_s:.0f}s after being asked to stop"
        elif worker.connected and silent > config.hang_missed_heartbeats * self.settings.heartbeat_interval_s:
            # Before its hello a worker is importing its engine library (torch takes
            # seconds), and heartbeats start after that: judged by load time below.
            return f"no heartbeat for {silent:.1f}s"
        elif worker.running:
            last = max(g.last_token_at or g.dispatched_at or now for g in worker.running.values())
            if now - last > config.stall_timeout_s:
                return f"no token for {now - last:.1f}s with a request in flight"
        elif worker.state in (WorkerState.SPAWNING, WorkerState.LOADING):
            if now - (times.last_progress_at or now) > config.load_stall_s:
                return f"no load progress for {now - (times.last_progress_at or now):.0f}s"
            if now - (times.started_at or now) > self.settings.load_timeout_s:
                return f"still loading after {self.settings.load_timeout_s:.0f}s"
        return None

    def _kill(self, engine: EngineState, reason: str, cause: str) -> None:
        worker = engine.worker
        if worker.hang_reason is None and worker.alive:
            worker.hang_reason, worker.kill_cause = reason, cause
            self.effects.kill_worker(worker.worker_id, self.config.kill_grace_s)

    def _maybe_probe_circuit(self, engine: EngineState, now: float) -> None:
        """Half-open: after the open period, one start decides whether the engine is back."""
        if not engine.breaker.probe_due(now):
            return
        if engine.breaker.code == ErrorCode.MODEL_NOT_FOUND and not self.effects.model_present(engine.model_path):
            engine.breaker.trip(now, ErrorCode.MODEL_NOT_FOUND, f"model file not found: {engine.model_path}")
            return
        log.info("circuit half-open: trying the engine again", engine=engine.name)
        self.effects.publish(
            TOPIC_ENGINE_CIRCUIT,
            engine=engine.name,
            state=Circuit.HALF_OPEN.value,
            code=engine.breaker.code,
            reason="probe start",
        )
        self.engines.start(engine, "circuit half-open probe", now)

    def _maybe_probe_liveness(self, engine: EngineState, now: float) -> None:
        """Honest liveness: an idle worker must still produce a token, not just heartbeats."""
        due = engine.worker.times.probe_due_at
        if (
            self.config.probe_interval_s <= 0
            or not engine.worker.idle
            or engine.queue
            or due is None
            or now < due
            or engine.retired
        ):
            return
        engine.worker.times.probe_due_at = now + self.config.probe_interval_s
        embeds = engine.config.embedding  # an embedding engine is probed with an embed of the same word
        params = GenerateParams(
            prompt=None if embeds else "Hello",
            messages=None,
            stream=not embeds,
            engine=engine.name,
            deadline_ms=int(self.config.probe_timeout_s * 1000),
            sampling=PROBE_SAMPLING,
            input=("Hello",) if embeds else None,
        )
        self.router.add_probe(Probe(id=f"probe-{next(self._probe_ids)}", params=params, received_at=now), engine, now)

    def judge_probe(self, probe: Probe, ok: bool, detail: str, now: float) -> None:
        """A liveness probe ended (the router's probe hook)."""
        engine = self.engines[probe.engine]
        self.effects.publish(
            TOPIC_PROBE,
            engine=engine.name,
            worker_id=probe.worker_id,
            ok=ok,
            ttft_ms=probe.engine_ttft_ms(),
            error=None if ok else detail,
        )
        if not ok and engine.worker.worker_id == probe.worker_id and engine.worker.alive:
            log.error(
                "liveness probe failed; replacing the worker",
                engine=engine.name,
                worker_id=probe.worker_id,
                error=detail,
            )
            self._kill(engine, f"liveness probe failed: {detail}", "probe_failure")
