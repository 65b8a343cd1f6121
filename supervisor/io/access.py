"""Who may connect to the daemon's sockets.

tcp endpoints are CURVE servers.  A ZAP handler (pyzmq's ThreadAuthenticator,
in a thread of its own, so a busy event loop never stalls a handshake) checks
each connecting key against its endpoint's ZAP domain:

* ``clients`` (the client and events endpoints): the public key files in
  ``security.authorized_keys_dir``, read again at every connection, so keys
  added or removed with ``node-supervisor keys`` count from the next
  connection on without a restart (a connected client stays connected);
* ``workers`` (the worker endpoint): only the key pair made for this run and
  handed to the workers the daemon spawns, so no client key opens it.

Every CURVE socket enforces its domain: without a ZAP handler answering, no
handshake succeeds.  ipc endpoints rely on the file system: the run directory
is 0750, socket files are 0660, and both belong to ``security.socket_group``
when it is set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator

from workers import protocol as p

from ..config import ConfigError, Settings
from ..node.keys import any_curve, authorized_public_keys, ensure_local_client_key, server_keypair, uses_curve
from ..logs import get_logger
from .transport import bind_socket

log = get_logger("supervisor.access")

CLIENTS_DOMAIN = "clients"
WORKERS_DOMAIN = "workers"
REFUSALS_LOGGED = 1024  # each refused key is logged once; past this many, refusals are no longer logged


def socket_group_id(settings: Settings) -> int | None:
    """The gid of ``security.socket_group``; a ConfigError naming the key when it cannot be used."""
    name = settings.security.socket_group
    if name is None:
        return None
    try:
        import grp
    except ImportError:
        raise ConfigError("security.socket_group: this platform has no groups (ipc sockets are POSIX only)") from None
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"security.socket_group: no group named {name!r}") from None
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ConfigError(
            f"security.socket_group: this user is not a member of {name!r}, so it cannot give its sockets to that group"
        )
    return gid


def prepare_run_dir(path: Path, group: int | None) -> None:
    """The directory of the lock file and the default ipc sockets: 0750, in ``group`` when given."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.name == "posix":
            os.chmod(path, 0o750)
            if group is not None:
                os.chown(path, -1, group)
    except OSError as exc:  # e.g. a run directory another user owns
        raise ConfigError(f"state_dir: cannot give {path} its mode (0750) and group: {exc.strerror or exc}") from None


class _KeyCheck:
    """A ZAP credentials provider: is this public key one of ``keys()``?  Called in the authenticator's thread."""

    def __init__(self, domain: str, keys: Callable[[], set[bytes]]) -> None:
        self.domain = domain
        self._keys = keys
        self._refused: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            if key in self._keys():
                return True
        except Exception:  # a bug here must refuse, never kill the handler's thread
            log.exception("internal error checking a client key", domain=domain)
            return False
        if key not in self._refused and len(self._refused) < REFUSALS_LOGGED:
            self._refused.add(key)
            log.warning(
                "refused a CURVE key that is not authorized", domain=domain, public_key=key.decode("ascii", "replace")
            )
        return False


class LocalAccess:
    """The run directory's permissions, the daemon's CURVE keys and its ZAP handler; binds every endpoint."""

    def __init__(self, settings: Settings, context: zmq.Context) -> None:
        self.context = context
        self.group = socket_group_id(settings)
        prepare_run_dir(settings.run_dir, self.group)
        self._authenticator: ThreadAuthenticator | None = None
        if not any_curve(settings):
            return
        self.server_public, self._server_secret = server_keypair(settings)
        ensure_local_client_key(settings)
        self._worker_public, self._worker_secret = zmq.curve_keypair()
        directory = settings.security.authorized_keys_dir
        assert directory is not None
        # Bound before any CURVE socket, so no handshake can come before its check.
        self._authenticator = ThreadAuthenticator(context)
        self._authenticator.start()
        self._authenticator.configure_curve_callback(
            CLIENTS_DOMAIN, _KeyCheck(CLIENTS_DOMAIN, lambda: authorized_public_keys(directory))
        )
        self._authenticator.configure_curve_callback(
            WORKERS_DOMAIN, _KeyCheck(WORKERS_DOMAIN, lambda: {self._worker_public})
        )
        log.info(
            "tcp endpoints take CURVE",
            server_public_key=self.server_public.decode(),
            authorized_keys_dir=str(directory),
        )

    def bind(self, kind: int, endpoint: str, options: dict[int, int | bytes], domain: str) -> zmq.Socket:
        """``bind_socket`` with the CURVE server options for a tcp endpoint, the group for an ipc one."""
        if uses_curve(endpoint):
            options = {
                **options,
                zmq.CURVE_SERVER: 1,
                zmq.CURVE_SECRETKEY: self._server_secret,
                zmq.ZAP_DOMAIN: domain.encode(),
                zmq.ZAP_ENFORCE_DOMAIN: 1,
            }
        return bind_socket(self.context, kind, endpoint, options, self.group)

    def worker_environ(self, worker_endpoint: str) -> dict[str, str]:
        """What a spawned worker needs in its environment to pass the worker endpoint's CURVE handshake."""
        if not uses_curve(worker_endpoint):
            return {}
        return {
            p.WORKER_CURVE_ENV: " ".join(
                key.decode("ascii") for key in (self.server_public, self._worker_public, self._worker_secret)
            )
        }

    def close(self) -> None:
        """Stop the ZAP handler: after the sockets close, before the context terminates."""
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
