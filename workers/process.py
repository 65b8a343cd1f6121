"""Process-level helpers of the worker, standard library only.

They are kept apart from runtime.py (which imports pyzmq) because the worker
needs them before it imports pyzmq: the engine library must be loaded first
(see __main__.py), and the worker should already die with its parent while
that import, which can take seconds, runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

from .protocol import WORKER_CURVE_ENV, WORKER_SECRET_ENV, ExitCode


def take_secret() -> str | None:
    """Read the daemon's per-spawn secret and remove it from the environment.

    Removed (``os.environ.pop`` unsets it for C code too) so that neither
    engine code nor the processes it starts can read it; an absent or empty
    variable means no secret, and the worker uses its plain id.
    """
    return os.environ.pop(WORKER_SECRET_ENV, None) or None


def take_curve_keys() -> tuple[str, str, str] | None:
    """The CURVE keys for a tcp worker endpoint (server public, own public, own secret), removed from the environment like the secret."""
    keys = (os.environ.pop(WORKER_CURVE_ENV, None) or "").split()
    return (keys[0], keys[1], keys[2]) if len(keys) == 3 else None


def die_orphaned(silence: float) -> None:
    """The daemon is gone: leave now, even if the main thread is inside the engine."""
    sys.stderr.write(f"worker: no word from the daemon for {silence:.1f}s; exiting\n")
    sys.stderr.flush()
    os._exit(ExitCode.ORPHANED)


def _prctl(option: int, argument: Any) -> bool:
    """Linux's prctl(2); False where there is none."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, argument)
    except OSError:
        return False
    return True


def name_this_thread(name: str) -> None:
    """Give the calling thread a name that `top -H` and /proc show (Linux; elsewhere nothing)."""
    PR_SET_NAME = 15
    _prctl(PR_SET_NAME, name.encode()[:15])


def exit_with_parent() -> None:
    """On Linux, have the kernel kill this worker the moment its parent dies."""
    PR_SET_PDEATHSIG = 1
    if not _prctl(PR_SET_PDEATHSIG, signal.SIGKILL):
        return  # no prctl: the heartbeat watchdog still ends an orphan
    if os.getppid() == 1:  # the parent died before prctl took effect
        die_orphaned(0.0)
