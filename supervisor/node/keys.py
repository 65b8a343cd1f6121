"""CURVE keys for tcp endpoints: the daemon's key pair, client key pairs, the authorized set.

Every key file is a ZeroMQ certificate as czmq's zcert and pyzmq's
``zmq.auth`` read and write them: ``NAME.key`` holds a public key,
``NAME.key_secret`` the public and the secret key.  With the defaults
(``[security]`` in docs/CONFIG.md)::

    <state_dir>/keys/            0700
        server.key               the daemon's public key: what a client checks the daemon against
        server.key_secret        the daemon's secret key, 0600
        authorized/              one NAME.key per client that tcp endpoints accept
        clients/                 pairs made by `node-supervisor keys new`: NAME.key_secret (0600), NAME.key

The daemon makes its own pair, and the pair named ``local`` that this node's
commands present, the first time it serves a tcp endpoint.  Run as root,
these functions give what they create to the owner of the directory it is
created in, so ``sudo node-supervisor keys new NAME`` leaves files the
daemon's own user can read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import zmq
from zmq.auth import load_certificate

from ..client import CurveKeys
from ..config import Settings

LOCAL_CLIENT = "local"  # the pair this node's own commands present (security.client_key_file's default)
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")  # 32 bytes in Z85


class KeysError(Exception):
    """A key file is missing, unreadable or malformed, or a name is taken; the message says which and what to do."""


def uses_curve(endpoint: str | None) -> bool:
    """tcp endpoints take CURVE; ipc endpoints are guarded by file permissions."""
    return bool(endpoint) and str(endpoint).startswith("tcp://")


def any_curve(settings: Settings) -> bool:
    return any(uses_curve(e) for e in (settings.client_endpoint, settings.worker_endpoint, settings.events_endpoint))


def parse_public_key(text: str | bytes) -> bytes:
    """A public key as Z85 text (40 characters), checked."""
    key = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    key = key.strip()
    if not _Z85_KEY.match(key):
        raise KeysError(f"not a CURVE public key (40 characters of Z85 text): {key[:60]!r}")
    return key.encode("ascii")


def check_name(name: str) -> str:
    if not KEY_NAME.match(name):
        raise KeysError(f"key name {name!r} must be letters, digits, '.', '-' or '_' (up to 64)")
    return name


# --- the daemon's side -----------------------------------------------------------------


def server_keypair(settings: Settings) -> tuple[bytes, bytes]:
    """The daemon's (public, secret) pair, made on first use; ``server.key`` is rewritten from the secret if missing."""
    keys_dir = _keys_dir(settings)
    secret_file, public_file = keys_dir / "server.key_secret", keys_dir / "server.key"
    public, secret = zmq.curve_keypair()
    _create(secret_file, _certificate(public, secret), 0o600)  # a pair already there wins
    public, secret = _load_pair(secret_file, "the daemon's secret key")
    try:
        current = load_certificate(public_file)[0]
    except (OSError, ValueError):
        current = None
    if current != public:
        public_file.unlink(missing_ok=True)
        _create(public_file, _certificate(public, None), 0o644)
    return public, secret


def ensure_local_client_key(settings: Settings) -> None:
    """This node's own pair (``clients/local``), made and authorized once.

    Made only when neither the pair nor an authorized key of that name exists:
    a key removed with ``keys remove local`` stays removed.
    """
    clients = _keys_dir(settings) / "clients"
    assert settings.security.authorized_keys_dir is not None
    if (
        not (clients / f"{LOCAL_CLIENT}.key_secret").exists()
        and not (settings.security.authorized_keys_dir / f"{LOCAL_CLIENT}.key").exists()
    ):
        new_client_key(settings, LOCAL_CLIENT)


def authorized_public_keys(directory: Path) -> set[bytes]:
    """The public keys in ``directory``'s ``*.key`` files; unreadable or malformed files authorize nothing."""
    return {key for key in authorized_keys(directory).values() if key is not None}


def authorized_keys(directory: Path) -> dict[str, bytes | None]:
    """name -> public key of every ``NAME.key`` file (None: the file holds no valid key)."""
    found: dict[str, bytes | None] = {}
    try:
        files = sorted(directory.glob("*.key"))
    except OSError:
        return found
    for path in files:
        try:
            found[path.stem] = parse_public_key(load_certificate(path)[0])
        except (OSError, ValueError, KeysError):
            found[path.stem] = None
    return found


# --- managing the authorized set (node-supervisor keys) -----------------------------------


def authorize(settings: Settings, name: str, public_key: str | bytes) -> Path:
    """Accept ``public_key`` as ``name`` from the next connection on; the same key again is no change."""
    key, directory = parse_public_key(public_key), _authorized_dir(settings)
    path = directory / f"{check_name(name)}.key"
    if path.exists():
        if authorized_keys(directory).get(name) == key:
            return path
        raise KeysError(
            f"{name!r} is already authorized with another key ({path}); remove it first: node-supervisor keys remove {name}"
        )
    if key in authorized_public_keys(directory):
        raise KeysError(f"this key is already authorized under another name: {path.parent}")
    _create(path, _certificate(key, None), 0o644)
    return path


def revoke(settings: Settings, name: str) -> Path:
    """Refuse ``name``'s key from the next connection on (connected clients stay connected until they reconnect)."""
    assert settings.security.authorized_keys_dir is not None
    path = settings.security.authorized_keys_dir / f"{check_name(name)}.key"
    try:
        path.unlink()
    except FileNotFoundError:
        raise KeysError(f"no authorized key named {name!r} in {path.parent}") from None
    return path


def new_client_key(settings: Settings, name: str) -> tuple[Path, bytes]:
    """A new client pair under ``clients/``, authorized; returns the secret file (to hand to the client) and the public key."""
    check_name(name)
    assert settings.security.authorized_keys_dir is not None
    if (settings.security.authorized_keys_dir / f"{name}.key").exists():
        raise KeysError(f"{name!r} is already authorized; remove it first: node-supervisor keys remove {name}")
    clients = _private_dir(_keys_dir(settings) / "clients")
    public, secret = zmq.curve_keypair()
    secret_file = clients / f"{name}.key_secret"
    if not _create(secret_file, _certificate(public, secret), 0o600):
        raise KeysError(f"a key pair named {name!r} exists already: {secret_file}")
    (clients / f"{name}.key").unlink(missing_ok=True)
    _create(clients / f"{name}.key", _certificate(public, None), 0o644)
    authorize(settings, name, public)
    return secret_file, public


# --- the client's side -----------------------------------------------------------------


def local_curve(settings: Settings, endpoint: str | None) -> CurveKeys | None:
    """The keys a command of this node presents on ``endpoint``: None for ipc."""
    if not uses_curve(endpoint):
        return None
    security = settings.security
    assert security.server_key_file is not None and security.client_key_file is not None
    server_public = _load_public(
        security.server_key_file,
        "security.server_key_file",
        "the daemon writes it when it first serves a tcp endpoint; on another machine or user, copy the daemon's server.key there",
    )
    public, secret = _load_pair(
        security.client_key_file,
        "security.client_key_file",
        "; the daemon makes this node's own pair when it first serves a tcp endpoint, `node-supervisor keys new NAME` makes others",
    )
    return CurveKeys(server_public, public, secret)


# --- files ---------------------------------------------------------------------------


def _keys_dir(settings: Settings) -> Path:
    assert settings.security.keys_dir is not None
    return _private_dir(settings.security.keys_dir)


def _authorized_dir(settings: Settings) -> Path:
    _keys_dir(settings)
    assert settings.security.authorized_keys_dir is not None
    return _private_dir(settings.security.authorized_keys_dir)


def _private_dir(path: Path) -> Path:
    """``path``, created 0700 if missing (an existing directory keeps the mode it was given)."""
    if path.is_dir():
        return path
    try:
        path.mkdir(parents=True, mode=0o700)
        if os.name == "posix":
            os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; this is exact
            _owned_like_parent(path)
    except FileExistsError:
        if not path.is_dir():
            raise KeysError(f"{path} exists and is not a directory") from None
    except OSError as exc:
        raise KeysError(f"cannot create {path}: {exc.strerror or exc}") from None
    return path


def _create(path: Path, text: str, mode: int) -> bool:
    """Write a new file, ``mode`` from the start (a secret is never readable by others, not even briefly); False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    except FileExistsError:
        return False
    except OSError as exc:
        raise KeysError(f"cannot create {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text)
    _owned_like_parent(path)
    return True


def _owned_like_parent(path: Path) -> None:
    """Run as root: give ``path`` to its directory's owner, who is the daemon's user, not root."""
    if os.name != "posix" or os.geteuid() != 0:
        return
    parent = path.parent.stat()
    if parent.st_uid != 0:
        os.chown(path, parent.st_uid, parent.st_gid)


def _certificate(public: bytes, secret: bytes | None) -> str:
    kind = "Secret" if secret else "Public"
    lines = [f"#   ZeroMQ CURVE {kind} Certificate (node-supervisor)"]
    if secret:
        lines.append("#   Give this file only to the client it was made for; keep it 0600.")
    lines += ["", "metadata", "curve", f'    public-key = "{public.decode("ascii")}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _load_public(path: Path, what: str, hint: str) -> bytes:
    try:
        return parse_public_key(load_certificate(path)[0])
    except OSError:
        raise KeysError(f"{what}: no key file at {path}; {hint}") from None
    except (ValueError, KeysError) as exc:
        raise KeysError(f"{what}: {path}: {exc}") from None


def _load_pair(path: Path, what: str, hint: str = "") -> tuple[bytes, bytes]:
    try:
        public, secret = load_certificate(path)
    except OSError as exc:
        reason = "no such file" if not path.exists() else (getattr(exc, "strerror", None) or str(exc))
        raise KeysError(f"{what}: cannot read {path}: {reason}{hint}") from None
    except ValueError as exc:
        raise KeysError(f"{what}: {path}: {exc}") from None
    if secret is None or not _Z85_KEY.match(secret.decode("ascii", "replace")):
        raise KeysError(f"{what}: {path} holds no secret key (a .key_secret file is needed, not a .key)")
    return parse_public_key(public), secret
