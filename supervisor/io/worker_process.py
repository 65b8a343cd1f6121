"""One worker slot: owns one child process at a time and drives its lifecycle.

The slot does not decide what to do about requests; it reports what happens
to its process (hello, ready, exit) to its owner through callbacks, and the
node decides.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import psutil

from workers import protocol as p

from .lifecycle import SlotState, check_transition
from .logs import get_logger

if TYPE_CHECKING:
    from .scheduler import Request

log = get_logger("supervisor.slot")

TAIL_LINES = 20  # last lines a worker printed, kept for crash reports


class WorkerSlot:
    def __init__(
        self,
        engine_name: str,
        kind: str,
        python: Path,
        worker_endpoint: str,
        heartbeat_interval: float,
        environ: dict[str, str],
        send: Callable[[str, dict[str, Any]], None],
        on_exit: Callable[["WorkerSlot", int | None, str], None],
        on_state: Callable[["WorkerSlot", SlotState, SlotState, str], None] = lambda *_: None,
    ) -> None:
        self.engine_name = engine_name
        self.kind = kind
        self.python = python
        self.worker_endpoint = worker_endpoint
        self.heartbeat_interval = heartbeat_interval
        self.environ = environ
        self._send = send
        self._on_exit = on_exit
        self._on_state = on_state
        self.state = SlotState.STOPPED
        self.state_reason = ""
        self.generation = 0
        self.worker_id = ""
        self.process: asyncio.subprocess.Process | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.hello: dict[str, Any] = {}
        self.model: dict[str, Any] = {}
        self.load_progress: float | None = None
        self.last_progress_at: float | None = None  # last hello or load progress report
        self.hang_reason: str | None = None  # set when the node killed the worker as hung
        self.stop_requested_at: float | None = None
        self.probe_due_at: float | None = None  # next liveness probe of an idle worker
        self.load_failure: dict[str, Any] | None = None
        self.heartbeat: dict[str, Any] = {}
        self.last_heard: float | None = None
        self.heartbeat_sent_at = 0.0  # the daemon's last heartbeat to this worker
        self.current: Request | None = None
        self.restarts = 0
        self.last_exit: dict[str, Any] | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- state ---------------------------------------------------------------

    def set_state(self, new: SlotState, reason: str) -> None:
        """The one place a slot's state changes: checked, then logged once."""
        old = self.state
        check_transition(old, new)
        self.state, self.state_reason = new, reason
        log.info(f"{old.value} -> {new.value} ({reason})", engine=self.engine_name, worker_id=self.worker_id or None)
        self._on_state(self, old, new, reason)

    @property
    def idle(self) -> bool:
        return self.state is SlotState.READY and self.current is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    # --- process -------------------------------------------------------------

    async def spawn(self, reason: str) -> None:
        self.generation += 1
        self.worker_id = f"{self.engine_name}.{self.generation}"
        self.hello, self.model, self.heartbeat = {}, {}, {}
        self.load_progress, self.load_failure, self.ready_at = None, None, None
        self.hang_reason = None
        self.tail.clear()
        command = [
            str(self.python), "-m", "workers",
            "--engine", self.kind,
            "--endpoint", self.worker_endpoint,
            "--worker-id", self.worker_id,
            "--heartbeat-interval", str(self.heartbeat_interval),
        ]  # fmt: skip
        self.set_state(SlotState.SPAWNING, reason)
        self.process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.environ,
            **_new_process_group(),
        )
        self.started_at = time.monotonic()
        self.last_heard = self.last_progress_at = self.started_at
        log.info("worker started", engine=self.engine_name, worker_id=self.worker_id, pid=self.process.pid)
        assert self.process.stdout and self.process.stderr
        relays = [
            self._track(self._relay_output(self.process.stdout, "stdout", self.process.pid)),
            self._track(self._relay_output(self.process.stderr, "stderr", self.process.pid)),
        ]
        self._track(self._wait(self.process, relays))

    def _track(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _relay_output(self, stream: asyncio.StreamReader, name: str, pid: int) -> None:
        """Re-log every line the worker prints, tagged with who printed it."""
        worker_id = self.worker_id
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the stream limit: take what is there
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            if worker_id == self.worker_id:
                self.tail.append(line)
            log.info(line, event_kind="worker.output", stream=name, engine=self.engine_name, worker_id=worker_id, pid=pid)

    async def _wait(self, process: asyncio.subprocess.Process, relays: list[asyncio.Task[Any]]) -> None:
        returncode = await process.wait()
        # The relays end at end-of-file: then the tail holds the worker's last words.
        # (A grandchild holding the pipes open must not delay the verdict.)
        await asyncio.wait(relays, timeout=0.5)
        if process is not self.process:
            return
        self.last_exit = describe_exit(returncode)
        if self.hang_reason:
            self.last_exit["cause"] = f"hung ({self.hang_reason}); {self.last_exit['cause']}"
        self.last_exit["last_lines"] = list(self.tail)[-10:]
        self.last_exit["at"] = time.time()
        self.process = None
        self._on_exit(self, returncode, self.last_exit["cause"])

    def send(self, message: dict[str, Any]) -> None:
        self._send(self.worker_id, message)

    def stop(self, reason: str) -> None:
        """Ask the worker to exit; the owner escalates if it does not."""
        if self.state in (SlotState.SPAWNING, SlotState.LOADING, SlotState.READY):
            spawning = self.state is SlotState.SPAWNING
            self.set_state(SlotState.STOPPING, reason)
            self.stop_requested_at = time.monotonic()
            if spawning:  # not connected yet: a message could not reach it
                self.signal(signal.SIGTERM)
            else:
                self.send({"type": p.S_SHUTDOWN})
        elif self.state in (SlotState.BACKOFF, SlotState.FAILED):
            self.set_state(SlotState.STOPPED, reason)

    def signal(self, sig: int) -> None:
        if self.process and self.process.returncode is None:
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass

    def kill_hung(self, reason: str, grace_s: float) -> None:
        """Terminate, grace, kill: a stopped (SIGSTOP) or wedged process ignores SIGTERM."""
        if self.hang_reason is not None or self.process is None:
            return  # already being killed
        self.hang_reason = reason
        process = self.process
        self.signal(signal.SIGTERM)

        def escalate() -> None:
            if process.returncode is None:
                try:
                    process.kill()
                except ProcessLookupError:
                    pass

        asyncio.get_running_loop().call_later(grace_s, escalate)

    async def wait_exit(self, timeout: float) -> bool:
        process = self.process
        if process is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def terminate(self, grace_s: float) -> None:
        """Shutdown message, grace, SIGTERM, grace, SIGKILL, reap."""
        self.stop("daemon stopping")
        if await self.wait_exit(grace_s):
            return
        log.warning("worker did not exit in time; terminating", worker_id=self.worker_id, pid=self.pid)
        self.signal(signal.SIGTERM)
        if await self.wait_exit(2.0):
            return
        self.signal(signal.SIGKILL if sys.platform != "win32" else signal.SIGTERM)
        await self.wait_exit(5.0)

    # --- status --------------------------------------------------------------

    def describe(self, now: float) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": self.worker_id,
            "state": self.state.value,
            "reason": self.state_reason,
            "pid": self.pid,
            "restarts": self.restarts,
            "uptime_s": round(now - self.started_at, 1) if self.started_at and self.process else None,
            "python": self.hello.get("python"),
            "executable": self.hello.get("executable"),
            "packages": self.hello.get("packages", {}),
            "versions": self.hello.get("versions", {}),
            "model": self.model,
            "load_progress": self.load_progress,
            "phase": self.heartbeat.get("phase"),
            "request_id": self.current.id if self.current else None,
            "last_heartbeat_age_ms": round((now - self.last_heard) * 1000, 1) if self.last_heard and self.process else None,
            "rss_bytes": _rss(self.pid),
            "last_exit": self.last_exit,
        }
        if self.load_failure:
            info["load_failure"] = self.load_failure
        return info


def describe_exit(returncode: int | None) -> dict[str, Any]:
    """Exit code or signal, in words an operator can act on."""
    if returncode is None:
        return {"exit_code": None, "signal": None, "cause": "unknown"}
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return {"exit_code": None, "signal": name, "cause": f"killed by {name}"}
    return {"exit_code": returncode, "signal": None, "cause": f"exited with code {returncode}"}


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def _new_process_group() -> dict[str, Any]:
    """Keep a terminal's Ctrl-C away from workers: the daemon stops them in order."""
    if sys.platform == "win32":
        import subprocess

        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}
