"""`node-supervisor keys [add NAME KEY | new NAME | remove NAME]`: the CURVE keys of tcp endpoints.

Run as the daemon's user (or root): the keys directory is 0700.  Changes
count from the next connection on; the daemon needs no restart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workers.protocol import ExitCode

from ..config import Settings
from ..node.keys import KeysError, authorize, authorized_keys, new_client_key, revoke, server_keypair


def keys_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.keys_command == "add":
            path = authorize(settings, args.name, _key_argument(args.public_key))
            print(f"authorized {args.name}: {path}")
        elif args.keys_command == "new":
            secret_file, public = new_client_key(settings, args.name)
            print(f"authorized {args.name}: {public.decode()}")
            print(f"its key pair (give it to that client only, to use as security.client_key_file): {secret_file}")
        elif args.keys_command == "remove":
            print(f"removed {args.name}: {revoke(settings, args.name)}")
        else:
            _show(settings)
    except KeysError as exc:
        print(f"node-supervisor: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    return 0


def _key_argument(text: str) -> str:
    """A key given as text, or the public key in a certificate file."""
    path = Path(text).expanduser()
    if len(text) == 40 and not path.is_file():
        return text
    try:
        for line in path.read_text(encoding="ascii", errors="replace").splitlines():
            name, _, value = line.strip().partition("=")
            if name.strip() == "public-key":
                return value.strip().strip("\"'")
    except OSError as exc:
        raise KeysError(
            f"{text}: neither a public key (40 characters) nor a readable key file: {exc.strerror or exc}"
        ) from None
    raise KeysError(f"{path}: no public-key line in this file")


def _show(settings: Settings) -> None:
    security = settings.security
    assert security.keys_dir is not None and security.authorized_keys_dir is not None
    public, _ = server_keypair(settings)  # made now if the daemon has not served tcp yet
    print(f"server public key: {public.decode()}  ({security.keys_dir / 'server.key'})")
    found = authorized_keys(security.authorized_keys_dir)
    print(f"authorized client keys ({security.authorized_keys_dir}): {len(found) or 'none'}")
    width = max((len(name) for name in found), default=0)
    for name, key in found.items():
        print(
            f"  {name:<{width}}  {key.decode() if key else '(no valid public key in this file: it authorizes nothing)'}"
        )
