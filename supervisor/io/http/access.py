"""Who may use the HTTP front: bearer keys, required when it listens beyond loopback.

Keys come from a file (one a line; blank lines and ``#`` comments ignored)
and from environment variables named in the configuration, never from the
configuration file itself, which is often readable by more people than
should hold a key.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from ...config import ConfigError, HttpConfig, is_loopback, split_listen
from ...logs import get_logger

log = get_logger("supervisor.http")


def load_api_keys(config: HttpConfig, environ: Mapping[str, str] | None = None, warn: bool = False) -> frozenset[bytes]:
    """Every configured key; ConfigError naming the key when one cannot be read, or none is
    configured while ``listen`` is beyond loopback.  ``warn``: log a key file every user can read."""
    environ = os.environ if environ is None else environ
    keys: set[bytes] = set()
    if config.api_keys_file is not None:
        keys |= _keys_from_file(config.api_keys_file, warn)
    for name in config.api_keys_env:
        value = environ.get(name, "").strip()
        if not value:
            raise ConfigError(f"http.api_keys_env: the environment variable {name} is not set or empty")
        keys.add(value.encode("utf-8", "surrogateescape"))
    if not keys and config.listen is not None and not is_loopback(split_listen(config.listen)[0]):
        raise ConfigError(
            f"http.api_keys_file: http.listen {config.listen!r} is reachable beyond this machine, so at least one "
            "API key is needed (http.api_keys_file or http.api_keys_env); bind 127.0.0.1 to serve without keys"
        )
    return frozenset(keys)


def _keys_from_file(path: os.PathLike[str], warn: bool) -> set[bytes]:
    try:
        lines = Path(path).read_bytes().splitlines()
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise ConfigError(f"http.api_keys_file: cannot read {path}: {exc.strerror or exc}") from None
    keys = {line.strip() for line in lines if line.strip() and not line.strip().startswith(b"#")}
    if not keys:
        raise ConfigError(f"http.api_keys_file: {path} holds no key (one a line)")
    if any(b" " in key or b"\t" in key for key in keys):
        raise ConfigError(f"http.api_keys_file: {path}: a key holds a space; give one key a line")
    if warn and os.name != "nt" and mode & 0o004:
        log.warning("the API key file is readable by every user; chmod o-r it", path=str(path))
    return keys


def bearer_allowed(authorization: str | None, keys: frozenset[bytes]) -> bool:
    """Whether an Authorization header carries one of ``keys`` (always, when there are none).

    Every key is compared, in constant time, so the answer's timing tells nothing about a key.
    """
    if not keys:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    offered = token.strip().encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(offered, key)
    return scheme.lower() == "bearer" and matched
