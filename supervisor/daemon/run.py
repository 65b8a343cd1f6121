"""`node-supervisor run`: prepare what the engines need, then serve until stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path
from typing import IO, Any, Callable

from workers.protocol import ExitCode

from ..config import ConfigError, Settings
from ..node.envs import EnvError, create_env, env_is_current
from ..io.sd_notify import Notifier
from ..io.startup_front import StartupProgress
from ..io.transport import BindError
from ..node.keys import KeysError
from ..logs import get_logger, setup_logging
from ..node.models import ensure_default_model
from . import preflight

log = get_logger("supervisor.daemon")
ENV_BUILD_EXTENSION_S = 600.0  # each line of a build pushes systemd's start timeout this far ahead


def run_daemon(
    settings: Settings,
    create_envs: bool,
    notifier: Notifier | None = None,
    on_serving: Callable[["DaemonHandle"], None] | None = None,
) -> int:
    """Prepare, then serve until stopped; the exit code.

    A host that runs the daemon in its own process (the Windows service)
    passes ``notifier`` to hear of start-up progress, and ``on_serving`` to
    get a :class:`DaemonHandle` once the daemon serves: its ``stop`` is the
    service's stop control.  Without them this is ``node-supervisor run``.
    """
    if (code := preflight.check_before_logging(settings)) is not None:
        return code
    log_file = setup_logging(
        settings.log_level, settings.log_dir, settings.log_format, settings.log_max_bytes, settings.log_backups
    )
    lock = _take_lock(settings.run_dir)
    if lock is None:
        log.error("another daemon is running with this state directory", state_dir=str(settings.state_dir))
        return ExitCode.TEMPFAIL
    if (code := preflight.check_before_binding(settings)) is not None:
        return code
    log.info("daemon starting", pid=os.getpid(), log_file=str(log_file), state_dir=str(settings.state_dir))
    try:
        return asyncio.run(_start_and_serve(settings, create_envs, notifier or Notifier(), on_serving))
    except (BindError, KeysError, ConfigError) as exc:  # an endpoint, a key file, the socket group
        log.error("cannot serve", error=str(exc))
        print(f"node-supervisor: {exc}", file=sys.stderr)
        return ExitCode.CONFIG


def prepare(
    settings: Settings, create_envs: bool, notifier: Notifier | None = None, progress: StartupProgress | None = None
) -> None:
    """Environments and the default model, created if missing (pip's output goes to the log line by line).

    An engine whose environment is still missing afterwards is reported by
    the node as unavailable; the other engines serve.  ``progress`` hears of
    each step and line, for clients asking while this runs.
    """
    notifier = notifier or Notifier({})
    progress = progress or StartupProgress()
    kinds = {config.env_name: config.kind for config in settings.engines.values()}
    for name, kind in kinds.items():
        progress.step(f"checking the {name} environment")
        if env_is_current(settings, name, kind):
            continue
        if not create_envs:
            log.warning("environment missing; not creating it (--no-create-envs)", env=name)
            continue
        # Under systemd: a build (llama.cpp compiles for minutes) must not count as a start that hangs.
        notifier.send(
            f"EXTEND_TIMEOUT_USEC={int(ENV_BUILD_EXTENSION_S * 1e6)}", f"STATUS=building the {name} environment"
        )
        progress.step(f"building the {name} environment")
        create_env(settings, name, kind, _build_line_logger(get_logger(f"envs.{name}"), notifier, progress))
    if any(config.model is None and config.kind == "llamacpp" for config in settings.engines.values()):
        model_log = get_logger("models")
        progress.step("assembling the default model")
        notifier.send(f"EXTEND_TIMEOUT_USEC={int(ENV_BUILD_EXTENSION_S * 1e6)}", "STATUS=installing the default model")
        ensure_default_model(settings, lambda line: (model_log.info(line), progress.line(line)))


def _build_line_logger(pip_log: Any, notifier: Notifier, progress: StartupProgress) -> Callable[[str], None]:
    """Each line of a build goes to the log and to clients asking, and keeps systemd waiting for the start a while longer."""

    def on_line(line: str) -> None:
        pip_log.info(line)
        progress.line(line)
        notifier.extend_timeout(ENV_BUILD_EXTENSION_S)

    return on_line


class DaemonHandle:
    """A serving daemon, stoppable from any thread: a Windows service's stop
    control arrives on the service manager's thread, not the event loop's."""

    def __init__(self, daemon: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._daemon = daemon
        self._loop = loop

    def stop(self, reason: str) -> None:
        """The daemon's one ordered stop (``request_stop``), run on its own loop."""
        try:
            self._loop.call_soon_threadsafe(self._daemon.request_stop, reason)
        except RuntimeError:  # the loop has closed: the daemon has already stopped
            pass


async def _start_and_serve(
    settings: Settings,
    create_envs: bool,
    notifier: Notifier,
    on_serving: Callable[[DaemonHandle], None] | None = None,
) -> int:
    """Bind the client socket, answer on it while preparing (io/startup_front.py), then serve; the exit code."""
    import zmq

    from ..io.access import LocalAccess
    from ..io.startup_front import StartupFront
    from .app import Daemon, bind_client_socket  # pyzmq and the core load only when serving

    loop = asyncio.get_running_loop()
    context = zmq.Context()
    access = LocalAccess(settings, context)  # before any bind: run directory, CURVE keys, ZAP handler
    client_socket = bind_client_socket(access, settings)
    progress = StartupProgress()
    front = StartupFront(client_socket, progress, settings.client_endpoint or "", str(settings.state_dir))
    front.reader.start(loop)
    stop_reason: list[str] = []
    _handle_signals(loop, stop_reason.append, lambda _: None)
    prepared: asyncio.Future[None] = loop.create_future()

    def preparing() -> None:  # a thread of its own: a stop need not wait for a build to end
        try:
            prepare(settings, create_envs, notifier, progress)
            loop.call_soon_threadsafe(_settle, prepared, None)
        except BaseException as exc:  # handed to the loop, which decides
            loop.call_soon_threadsafe(_settle, prepared, exc)

    threading.Thread(target=preparing, name="prepare", daemon=True).start()
    while not prepared.done() and not stop_reason:
        await asyncio.wait([prepared], timeout=0.1)
    front.reader.stop()
    if stop_reason or prepared.exception() is not None:
        client_socket.close(0)
        access.close()
        context.term()
        preflight.remove_socket_files(settings)
        if stop_reason:
            log.info("stop requested during start-up; stopped", reason=stop_reason[0], phase=progress.phase)
            return 0
        error = prepared.exception()
        if isinstance(error, EnvError):
            log.error("preparation failed", error=str(error))
            return ExitCode.UNAVAILABLE
        assert error is not None
        raise error
    daemon = Daemon(settings, context, access, client_socket)
    _handle_signals(loop, daemon.request_stop, daemon.request_reload)
    if on_serving is not None:
        # Runs once daemon.run() has reached its wait: sockets bound, readers started.
        loop.call_soon(on_serving, DaemonHandle(daemon, loop))
    await daemon.run()
    return 0


def _settle(future: "asyncio.Future[None]", error: BaseException | None) -> None:
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _handle_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[str], Any], reload: Callable[[str], Any]) -> None:
    """Handlers only record the signal; the daemon stops (or reloads) from its loop."""
    handlers = [(signal.SIGTERM, stop), (signal.SIGINT, stop)]
    if hasattr(signal, "SIGHUP"):
        handlers.append((signal.SIGHUP, reload))
    for sig, handler in handlers:
        try:
            loop.add_signal_handler(sig, handler, signal.Signals(sig).name)
        except (NotImplementedError, RuntimeError):  # Windows: the service wrapper calls request_stop
            pass


def _take_lock(run_dir: Path) -> IO[str] | None:
    """Hold an exclusive lock for the daemon's lifetime: one daemon per state directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / "daemon.lock", "a+")
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
