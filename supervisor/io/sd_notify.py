"""systemd's notify protocol: one datagram per message to ``$NOTIFY_SOCKET``.

A few lines of standard library instead of a dependency: READY=1, STATUS=…,
WATCHDOG=1, EXTEND_TIMEOUT_USEC=…, RELOADING=1, STOPPING=1.  Abstract socket names (a
leading ``@``) are supported.  Without ``$NOTIFY_SOCKET`` (not run by systemd
with Type=notify) every call does nothing.  A notify that fails is logged
once and never stops the daemon.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

from ..logs import get_logger

log = get_logger("supervisor.sd_notify")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        # The watchdog is ours when systemd set it for this process (or for no process in particular).
        mine = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_s = (
            int(watchdog_usec) / 1e6 if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and mine else None
        )
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; False when there is no socket or it failed."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(assignments).encode("utf-8", "replace"))
            return True
        except OSError as exc:
            if not self._failed:
                log.warning("systemd notify failed", socket=self.address.replace("\0", "@"), error=str(exc))
                self._failed = True
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> bool:
        """Start-up (or stop) will take this much longer: environments build, models load."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self, monotonic_usec: int) -> bool:
        """A reload begins; READY=1 ends it.  systemd wants the CLOCK_MONOTONIC time with it."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", "STATUS=reloading the configuration")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")
