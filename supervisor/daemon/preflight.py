"""Checks made before the daemon binds or writes anything.

A daemon that cannot start should say why in one line and exit with a code
systemd can act on (78: fix the config, do not restart; 75: in use, try
later), instead of a traceback from deep inside start-up.  Two failures are
worse than a traceback: ZeroMQ's ipc bind unlinks whatever file is at the
socket path, so a second daemon given a live daemon's endpoint would silently
take its clients; and ``setup_logging`` creates directories under state_dir.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
import tempfile
from pathlib import Path

from workers.protocol import ExitCode

from ..config import ConfigError, Settings, split_listen, unknown_environment_variables
from ..io.access import socket_group_id
from ..io.http.access import load_api_keys
from ..logs import get_logger

log = get_logger("supervisor.preflight")

ENDPOINT_KEYS = ("client_endpoint", "worker_endpoint", "events_endpoint")
_STALE_ERRNOS = (errno.ECONNREFUSED, errno.ENOENT)  # nobody listens: the file was left behind
_LIVE_ERRNOS = (errno.EAGAIN,)  # a listener whose backlog is full


class EndpointInUse(Exception):
    """A live process serves an endpoint this daemon is configured to bind."""


def check_state_dir(settings: Settings) -> None:
    """state_dir (and log_dir) must be directories this process can write.

    Checked first because logging and the lock file are created there; a
    file in the way or a read-only path would otherwise surface as a
    traceback from ``mkdir``.
    """
    _check_writable_dir("state_dir", settings.state_dir)
    if settings.log_dir is not None:
        _check_writable_dir("log_dir", settings.log_dir)


def _check_writable_dir(key: str, path: Path) -> None:
    """Create ``path`` if missing, then create and drop a file in it: the only
    test that also holds for root (who passes every permission check but
    still cannot write under a file or on a read-only mount)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: {path} is not a writable directory: {exc.strerror or exc}") from None


def check_tcp_endpoints(settings: Settings) -> None:
    """Every ``tcp://host:port`` endpoint with a concrete port must be free.

    A taken port otherwise fails inside ZeroMQ's bind with a traceback; a
    port that stays taken is a configuration problem, so it is reported as one.
    """
    for key in ENDPOINT_KEYS:
        address = _tcp_address(getattr(settings, key) or "")
        if address is not None:
            _try_bind(key, *address)


def _tcp_address(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of a bindable tcp endpoint; None for ipc, ``*``/0 ports and forms not checked here."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None
    host = host.strip("[]")
    return ("0.0.0.0" if host in ("*", "") else host), int(port)  # ZeroMQ's * is IPv4 unless ZMQ_IPV6


def _try_bind(key: str, host: str, port: int) -> None:
    """Bind and release the address as ZeroMQ would (SO_REUSEADDR on POSIX,
    so a port in TIME_WAIT after a restart does not count as taken).  Hosts
    that do not resolve (ZeroMQ also accepts interface names) are left to ZeroMQ."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        return
    with socket.socket(family, kind, proto) as probe:
        if os.name != "nt":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot bind tcp://{host}:{port}: {exc.strerror or exc}") from None


def check_http(settings: Settings) -> None:
    """The HTTP front's address can be bound, and its keys read (at least one beyond loopback)."""
    if settings.http.listen is None:
        return
    load_api_keys(settings.http)
    host, port = split_listen(settings.http.listen)
    if port:
        _try_bind("http.listen", host, port)


def claim_ipc_endpoints(settings: Settings) -> list[Path]:
    """Make every ipc endpoint's path free to bind; return the stale socket files removed.

    Raises EndpointInUse when a live process accepts connections on one (the
    lock file only guards the state directory, and another daemon may use
    another state directory with the same endpoint), and ConfigError when the
    path holds something other than a socket, which the bind would delete.
    """
    if not hasattr(socket, "AF_UNIX"):
        return []
    return [path for key, path in ipc_socket_paths(settings) if _claim_socket_path(key, path)]


def ipc_socket_paths(settings: Settings) -> list[tuple[str, Path]]:
    """(key, file) of every ipc endpoint with a file (ipc://@name is Linux's abstract namespace: none)."""
    paths = []
    for key in ENDPOINT_KEYS:
        endpoint = getattr(settings, key) or ""
        if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
            paths.append((key, Path(endpoint[len("ipc://") :])))
    return paths


def remove_socket_files(settings: Settings) -> None:
    """After a clean stop (the lock still held, so no other daemon bound them since): leave no socket file behind."""
    for _, path in ipc_socket_paths(settings):
        try:
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
        except OSError:
            pass


def _claim_socket_path(key: str, path: Path) -> bool:
    """True when a stale socket file was removed from ``path``."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{key}: {path} exists and is not a socket")
    if _accepts_connections(key, path):
        raise EndpointInUse(f"{key}: {path} is served by another live process")
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot remove the stale socket file {path}: {exc.strerror or exc}") from None
    return True


def _accepts_connections(key: str, path: Path) -> bool:
    """Connect to the socket: success (or a full backlog) means a process listens;
    ECONNREFUSED/ENOENT mean the file was left behind by one that has exited.
    A plain connect suffices: ZeroMQ drops a peer that never sends its greeting."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except TimeoutError:
            return True
        except OSError as exc:
            if exc.errno in _STALE_ERRNOS:
                return False
            if exc.errno in _LIVE_ERRNOS:
                return True
            raise ConfigError(f"{key}: cannot check {path}: {exc.strerror or exc}") from None
    return True


def check_before_logging(settings: Settings) -> int | None:
    """The configuration checks of start-up; on failure one line on stderr and the exit code.

    Runs before logging is set up (it writes under state_dir), so it prints.
    """
    try:
        check_state_dir(settings)
        check_tcp_endpoints(settings)
        check_http(settings)
        socket_group_id(settings)  # a group that does not exist, or that this user cannot give files to
    except ConfigError as exc:
        print(f"node-supervisor: config error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    return None


def check_before_binding(settings: Settings) -> int | None:
    """Warnings about the environment, then the ipc claim; on failure one log line and the exit code.

    Runs once the state-directory lock is held, so two daemons sharing a
    state directory never remove each other's fresh sockets.
    """
    for name in unknown_environment_variables(os.environ):
        log.warning("unknown environment variable ignored; not a setting", variable=name)
    try:
        for path in claim_ipc_endpoints(settings):
            log.info("removed a stale socket file", path=str(path))
    except EndpointInUse as exc:
        log.error(f"endpoint in use: {exc}")
        return ExitCode.TEMPFAIL
    except ConfigError as exc:
        log.error(f"config error: {exc}")
        return ExitCode.CONFIG
    return None
