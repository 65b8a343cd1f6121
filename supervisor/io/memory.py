"""Giving memory back after large messages (glibc only; elsewhere these do nothing).

A burst of large frames (ZeroMQ frames up to the hard limit, HTTP bodies up
to ``max_message_bytes``) leaves glibc's heap grown: its mmap threshold
rises with every large block freed, so later large blocks come from the heap
and stay there, fragmented.  :func:`fix_mmap_threshold` pins the threshold,
so a block of ``MMAP_THRESHOLD`` or more is its own mapping, unmapped when
freed; :func:`trim_soon` asks glibc (``malloc_trim``) to hand back what its
heaps hold free, shortly after a large message (once for a burst).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import sys
from typing import Any

M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)
MMAP_THRESHOLD = (
    4 << 20
)  # at 1 MiB, test_fuzz ran twice as long (a mapping and its page faults per body); 4 MiB: as before
LARGE_BYTES = 256 << 10  # a message this large is followed by a trim
TRIM_DELAY_S = 0.5  # after a large message; the others of its burst ride on the same trim

_libc: Any = None
_pending: asyncio.TimerHandle | None = None
trims = 0


def _glibc() -> Any:
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _ = libc.malloc_trim, libc.mallopt  # musl has neither
                _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc


def fix_mmap_threshold() -> bool:
    """Large blocks as their own mappings from now on (returned to the system when freed)."""
    libc = _glibc()
    return bool(libc) and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def trim() -> None:
    global trims
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
        trims += 1


def trim_soon(size: int) -> None:
    """After a message of ``size`` bytes: a trim TRIM_DELAY_S after the last large one (on the running loop)."""
    global _pending
    if size < LARGE_BYTES or not _glibc():
        return
    if _pending is not None:
        return  # one trim for the whole burst, at most TRIM_DELAY_S after its first large message
    try:
        _pending = asyncio.get_running_loop().call_later(TRIM_DELAY_S, _trim_now)
    except RuntimeError:  # not on a loop (a tool, a test): now
        trim()


def _trim_now() -> None:
    global _pending
    _pending = None
    trim()
