"""Worker processes: spawn, relay their output to the log, signal, reap.

What a process's exit means is the core's business; this module only
reports it (exit code or signal, the last lines printed).  Each spawn gets a
secret in its environment: the worker's ZeroMQ routing id carries it, so a
local process that merely knows a worker id cannot speak for that worker.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import psutil

from workers import protocol as p

from ..core.effects import WorkerLaunch
from ..logs import get_logger
from . import job_object

log = get_logger("supervisor.worker_process")

# The worker's logging format, "%(levelname)s %(name)s: %(message)s" (workers/__main__.py).
WORKER_LOG_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.-]+): (.*)", re.DOTALL)
TAIL_LINES = 20  # last lines a worker printed, kept for crash reports
ExitFn = Callable[[str, "int | None", dict[str, Any]], None]  # worker id, return code, exit description


class WorkerProcess:
    """One spawned worker: its process, its output relays, its exit."""

    def __init__(self, launch: WorkerLaunch, command: list[str], environ: dict[str, str], on_exit: ExitFn) -> None:
        self.launch = launch
        self.worker_id = launch.worker_id
        self.secret = secrets.token_hex(16)
        self._command = command
        self._environ = {**environ, p.WORKER_SECRET_ENV: self.secret}
        if launch.devices is not None:  # placed on these GPUs: the worker sees only them (as devices 0, 1, ...)
            self._environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # NVML's numbering
            self._environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in launch.devices)
        self._on_exit = on_exit
        self.process: asyncio.subprocess.Process | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._pending_signal: int | None = None  # asked before the process existed
        self._spawn_ended = asyncio.Event()  # the spawn succeeded or failed: self.process is final
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def routing_id(self) -> bytes:
        """The routing id its main socket will connect with (the watchdog's adds protocol.WATCHDOG_SUFFIX)."""
        return p.worker_routing_id(self.worker_id, self.secret).encode()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def run(self) -> None:
        """Spawn, relay, wait; report the exit exactly once (a failed spawn is an exit too)."""
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._environ,
                **_new_process_group(),
            )
        except OSError as exc:
            self._spawn_ended.set()
            log.error("worker could not be started", worker_id=self.worker_id, error=str(exc))
            self._on_exit(
                self.worker_id,
                None,
                {
                    "exit_code": None,
                    "signal": None,
                    "cause": f"could not start: {exc}",
                    "last_lines": [],
                    "at": time.time(),
                },
            )
            return
        self._spawn_ended.set()
        job_object.contain(self.process.pid)  # Windows: it dies with this process, whatever ends it
        log.info("worker started", engine=self.launch.engine, worker_id=self.worker_id, pid=self.process.pid)
        if self._pending_signal is not None:
            self.signal(self._pending_signal)
        assert self.process.stdout and self.process.stderr
        relays = [
            self._track(self._relay(self.process.stdout, "stdout")),
            self._track(self._relay(self.process.stderr, "stderr")),
        ]
        returncode = await self.process.wait()
        # The relays end at end-of-file: then the tail holds the worker's last words.
        # (A grandchild holding the pipes open must not delay the verdict.)
        await asyncio.wait(relays, timeout=0.5)
        info = describe_exit(returncode)
        info.update(last_lines=list(self.tail)[-10:], at=time.time())
        self._on_exit(self.worker_id, returncode, info)

    def _track(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _relay(self, stream: asyncio.StreamReader, name: str) -> None:
        """Re-log every line the worker prints, tagged with who printed it."""
        pid = self.pid
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the stream limit: take what is there
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.tail.append(line)
                level, source, text = parse_worker_line(line)
                origin = {"source": source} if source else {}  # the worker's logger, e.g. llama.cpp
                log.log(
                    level,
                    text,
                    event_kind="worker.output",
                    stream=name,
                    **origin,
                    engine=self.launch.engine,
                    worker_id=self.worker_id,
                    pid=pid,
                )

    def signal(self, sig: int) -> None:
        if self.process is None:
            self._pending_signal = sig
        elif self.process.returncode is None:
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass

    def kill(self, grace_s: float) -> None:
        """Terminate, grace, kill: a stopped (SIGSTOP) or wedged process ignores SIGTERM."""
        self.signal(signal.SIGTERM)
        asyncio.get_running_loop().call_later(
            grace_s, self.signal, signal.SIGKILL if sys.platform != "win32" else signal.SIGTERM
        )

    async def wait_exit(self, timeout: float) -> bool:
        """Has it exited within ``timeout``?  A spawn still under way is waited
        for: a stop that came first reaches the process as it starts (the
        pending signal), and the process must be gone before the daemon is."""
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self._spawn_ended.wait(), timeout)
            if self.process is None:
                return True  # the spawn failed
            await asyncio.wait_for(asyncio.shield(self.process.wait()), max(0.0, deadline - time.monotonic()))
            return True
        except asyncio.TimeoutError:
            return False

    def rss(self) -> int | None:
        if self.pid is None or self.process is None or self.process.returncode is not None:
            return None
        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return None


def parse_worker_line(line: str) -> tuple[int, str | None, str]:
    """(level, the worker's logger, the text) of a line a worker printed.

    Workers log one line per record as ``LEVEL logger: text`` (workers/__main__.py),
    llama.cpp's log included (workers/llamacpp/log.py); such a line is logged at
    its own level.  Anything else a worker prints (a traceback, a library's own
    print) is logged at info as it is.
    """
    match = WORKER_LOG_LINE.match(line)
    if match is None:
        return logging.INFO, None, line
    return logging.getLevelName(match.group(1)), match.group(2), match.group(3)


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


def worker_command(
    python: Path, launch: WorkerLaunch, endpoint: str, heartbeat_interval: float, log_level: str = "info"
) -> list[str]:
    """A worker logs at the daemon's level: debug lines cross the pipe only when they will be kept."""
    return [
        str(python),
        "-m",
        "workers",
        "--engine",
        launch.kind,
        "--endpoint",
        endpoint,
        "--worker-id",
        launch.worker_id,
        "--heartbeat-interval",
        str(heartbeat_interval),
        "--log-level",
        log_level.upper(),
    ]


def _new_process_group() -> dict[str, Any]:
    """Keep a terminal's Ctrl-C away from workers: the daemon stops them in order."""
    if sys.platform == "win32":
        import subprocess

        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}
