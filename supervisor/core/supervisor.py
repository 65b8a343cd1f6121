"""Keeping workers alive: exits, restarts, hangs, circuit breakers, probes, engine choice.

The decisions themselves are in policy.py (pure); this module applies them
to slots and processes and tells the node which requests to move or fail.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import TYPE_CHECKING

from workers import protocol as p
from workers.protocol import ErrorCode

from . import events as ev
from .engines import EngineRuntime
from .lifecycle import SlotState
from .logs import get_logger
from .policy import Circuit, LatencySwitch, retry_can_help
from .requests import GenerateParams
from .scheduler import Request
from .slot import WorkerSlot

if TYPE_CHECKING:
    from .node import Node

log = get_logger("supervisor.supervise")

_PROBE_IDS = itertools.count(1)


class Supervisor:
    def __init__(self, node: "Node") -> None:
        self.node = node
        self.settings = node.settings
        self.config = node.settings.supervision
        self.engines = node.engines
        self.events = node.events
        self.switch = LatencySwitch(min_dwell_s=self.config.switch_min_dwell_s, breach_for_s=self.config.switch_breach_for_s)
        self._gpu_waiting: set[str] = set()  # cold GPU engines waiting for another's memory

    # --- starting ----------------------------------------------------------------

    async def start(self) -> None:
        for engine in self.engines.values():
            if engine.config.standby == "warm" and engine.refusal is None:
                await self.start_engine(engine, "daemon start")
        self.route(time.monotonic())

    async def start_engine(self, engine: EngineRuntime, reason: str) -> None:
        """Start an engine's worker, first making room on the GPU if it needs one."""
        if engine.slot.process is not None or self.node.stopping:
            return
        if engine.config.uses_gpu:
            holders = [e for e in self.engines.values() if e is not engine and e.config.uses_gpu and e.slot.process is not None]
            if holders:
                # Two GPU engines loading at once is how VRAM runs out: wait until
                # the other one has exited and its memory is released.
                self._gpu_waiting.add(engine.name)
                for holder in holders:
                    holder.slot.stop(f"making room on the GPU for {engine.name}")
                return
        self._gpu_waiting.discard(engine.name)
        await engine.slot.spawn(reason)

    def ensure_started(self, engine: EngineRuntime, reason: str) -> None:
        if engine.slot.state is SlotState.STOPPED and engine.refusal is None:
            asyncio.ensure_future(self.start_engine(engine, reason))

    # --- routing -----------------------------------------------------------------

    def route(self, now: float) -> None:
        """Re-evaluate which engine takes unpinned traffic; move waiting requests if it changed."""
        by_priority = [e.name for e in sorted(self.engines.values(), key=lambda e: e.config.priority)]
        # A cold engine is the standby for when every warm engine is refused
        # (failed, circuit open), not for a warm engine that is merely starting
        # or restarting.
        warm_all_refused = all(e.refusal is not None for e in self.engines.values() if e.config.standby == "warm")
        healthy = {e.name for e in self.engines.values() if e.healthy and (e.slot.state is SlotState.READY or warm_all_refused)}
        verdicts = {e.name: e.verdict(now, self.config) for e in self.engines.values()}
        previous = self.switch.active
        active, why = self.switch.decide(now, by_priority, healthy, verdicts)
        if active is None or active == previous:
            return
        log.warning("engine switch", from_engine=previous, to_engine=active, reason=why)
        self.events.publish(ev.TOPIC_ENGINE_SWITCH, **{"from": previous, "to": active, "reason": why})
        target = self.engines[active]
        self.ensure_started(target, f"traffic switched here: {why}")
        if previous in self.engines:
            self.node.move_unpinned(self.engines[previous], target)

    def target_for_unpinned(self) -> EngineRuntime | None:
        active = self.engines.get(self.switch.active or "")
        if active is not None and active.refusal is None:
            return active
        usable = [e for e in self.engines.values() if e.refusal is None]
        return min(usable, key=lambda e: e.config.priority) if usable else None

    # --- worker events -------------------------------------------------------------

    def on_ready(self, slot: WorkerSlot) -> None:
        engine = self.engines[slot.engine_name]
        if engine.breaker.record_success():
            log.info("circuit closed", engine=engine.name)
            self.events.publish(ev.TOPIC_ENGINE_CIRCUIT, engine=engine.name, state=Circuit.CLOSED.value, code=None, reason="worker ready")
        slot.probe_due_at = time.monotonic() + self.config.probe_interval_s
        self.route(time.monotonic())

    def on_exit(self, slot: WorkerSlot, returncode: int | None, cause: str) -> None:
        now = time.monotonic()
        engine = self.engines[slot.engine_name]
        request, slot.current = slot.current, None
        exit_info = slot.last_exit or {}
        intended = slot.state is SlotState.STOPPING or self.node.stopping
        (log.info if intended else log.error)(
            "worker exited",
            engine=engine.name,
            worker_id=slot.worker_id,
            cause=cause,
            exit_code=exit_info.get("exit_code"),
            signal=exit_info.get("signal"),
            last_lines=exit_info.get("last_lines"),
        )
        self.events.publish(
            ev.TOPIC_WORKER_EXIT,
            engine=engine.name,
            worker_id=slot.worker_id,
            exit_code=exit_info.get("exit_code"),
            signal=exit_info.get("signal"),
            cause=cause,
            intended=intended,
            last_lines=exit_info.get("last_lines"),
        )
        if intended:
            if slot.state is SlotState.STOPPING:
                slot.set_state(SlotState.STOPPED, cause)
        elif not retry_can_help(returncode):
            failure = slot.load_failure or {}
            reason = f"{failure.get('message') or cause} (exit code {returncode})"
            slot.set_state(SlotState.FAILED, reason)
            engine.hard_failure = (ErrorCode.ENGINE_UNAVAILABLE, reason)
        else:
            self._after_failure(engine, slot, returncode, cause, now)
        if request is not None and not request.finished:
            self.node.requeue_or_fail(engine, request, cause)
        if engine.refusal is not None:
            self.node.reroute_queue(engine)
        self.route(now)
        for name in list(self._gpu_waiting):
            self.ensure_started(self.engines[name], "GPU memory released")

    def _after_failure(self, engine: EngineRuntime, slot: WorkerSlot, returncode: int | None, cause: str, now: float) -> None:
        """An unexpected exit: back off and restart, or open the circuit."""
        failure = slot.load_failure or {}
        code = failure.get("code") or ErrorCode.ENGINE_FAILED
        reason = failure.get("message") or cause
        if returncode == p.ExitCode.MODEL_ERROR:
            engine.breaker.trip(now, code, reason)  # the same file fails the same way: no point counting
            opened = True
        else:
            opened = engine.breaker.record_failure(now, code, reason)
        slot.restarts += 1
        if opened:
            slot.set_state(SlotState.BACKOFF, f"circuit open: {reason}; probe in {engine.breaker.open_s:.0f}s")
            log.error("circuit open", engine=engine.name, reason=reason)
            self.events.publish(ev.TOPIC_ENGINE_CIRCUIT, engine=engine.name, state=Circuit.OPEN.value, code=code, reason=reason)
            return
        delay = engine.backoff.next_delay(slot.ready_at, now)
        slot.set_state(SlotState.BACKOFF, f"{cause}; restarting in {delay:.1f}s")
        asyncio.get_running_loop().call_later(delay, self._restart, engine)

    def _restart(self, engine: EngineRuntime) -> None:
        if engine.slot.state is SlotState.BACKOFF and engine.breaker.state is Circuit.CLOSED and not self.node.stopping:
            asyncio.ensure_future(self.start_engine(engine, "restart after backoff"))

    # --- the periodic look at every worker -------------------------------------------

    def tick(self, now: float) -> None:
        for engine in self.engines.values():
            slot = engine.slot
            if slot.process is not None and slot.worker_id:
                if now - slot.heartbeat_sent_at >= self.settings.heartbeat_interval_s:
                    slot.heartbeat_sent_at = now
                    self.node.send_worker(p.watchdog_identity(slot.worker_id), {"type": p.S_HEARTBEAT})
                self._check_hang(engine, slot, now)
            self._maybe_probe_circuit(engine, now)
            self._maybe_probe_liveness(engine, slot, now)
        self.route(now)

    def _check_hang(self, engine: EngineRuntime, slot: WorkerSlot, now: float) -> None:
        config = self.config
        silent = now - (slot.last_heard or now)
        reason = None
        if slot.state is SlotState.STOPPING:
            if now - (slot.stop_requested_at or now) > self.settings.shutdown_grace_s:
                reason = f"still running {self.settings.shutdown_grace_s:.0f}s after being asked to stop"
        elif silent > config.hang_missed_heartbeats * self.settings.heartbeat_interval_s:
            reason = f"no heartbeat for {silent:.1f}s"
        elif slot.current is not None and slot.current.dispatched_at is not None:
            last = slot.current.last_token_at or slot.current.dispatched_at
            if now - last > config.stall_timeout_s:
                reason = f"no token for {now - last:.1f}s with a request in flight"
        elif slot.state in (SlotState.SPAWNING, SlotState.LOADING):
            # Loading is judged by its own progress, never by generation timeouts.
            if now - (slot.last_progress_at or now) > config.load_stall_s:
                reason = f"no load progress for {now - (slot.last_progress_at or now):.0f}s"
            elif now - (slot.started_at or now) > self.settings.load_timeout_s:
                reason = f"still loading after {self.settings.load_timeout_s:.0f}s"
        if reason is not None and slot.hang_reason is None:
            log.error("worker hung; killing it", engine=engine.name, worker_id=slot.worker_id, reason=reason)
            self.events.publish(ev.TOPIC_WORKER_HANG, engine=engine.name, worker_id=slot.worker_id, reason=reason)
            slot.kill_hung(reason, config.kill_grace_s)

    def _maybe_probe_circuit(self, engine: EngineRuntime, now: float) -> None:
        """Half-open: after the open period, one start decides whether the engine is back."""
        if not engine.breaker.probe_due(now):
            return
        if engine.breaker.code == ErrorCode.MODEL_NOT_FOUND and not Path(engine.model_path).exists():
            engine.breaker.trip(now, ErrorCode.MODEL_NOT_FOUND, f"model file not found: {engine.model_path}")
            return
        log.info("circuit half-open: trying the engine again", engine=engine.name)
        self.events.publish(ev.TOPIC_ENGINE_CIRCUIT, engine=engine.name, state=Circuit.HALF_OPEN.value, code=engine.breaker.code, reason="probe start")
        asyncio.ensure_future(self.start_engine(engine, "circuit half-open probe"))

    def _maybe_probe_liveness(self, engine: EngineRuntime, slot: WorkerSlot, now: float) -> None:
        """Honest liveness: an idle worker must still produce a token, not just heartbeats."""
        if self.config.probe_interval_s <= 0 or not slot.idle or engine.queue or slot.probe_due_at is None:
            return
        if now < slot.probe_due_at:
            return
        slot.probe_due_at = now + self.config.probe_interval_s
        params = GenerateParams(
            prompt="Hello",
            messages=None,
            stream=True,
            engine=engine.name,
            deadline_ms=int(self.config.probe_timeout_s * 1000),
            sampling={"max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 1, "stop": [], "seed": 0, "ignore_eos": False},
        )
        probe = Request(client=b"", id=f"probe-{next(_PROBE_IDS)}", params=params, engine=engine.name, internal=True)
        self.node.submit(engine, probe)

    def on_probe_end(self, request: Request, ok: bool, detail: str) -> None:
        engine = self.engines[request.engine]
        slot = engine.slot
        ttft = None
        if request.first_token_at is not None and request.dispatched_at is not None:
            ttft = round((request.first_token_at - request.dispatched_at) * 1000, 3)
        self.events.publish(ev.TOPIC_PROBE, engine=engine.name, worker_id=request.worker_id, ok=ok, ttft_ms=ttft, error=None if ok else detail)
        if not ok and slot.worker_id == request.worker_id and slot.process is not None:
            log.error("liveness probe failed; replacing the worker", engine=engine.name, worker_id=slot.worker_id, error=detail)
            slot.kill_hung(f"liveness probe failed: {detail}", self.config.kill_grace_s)
