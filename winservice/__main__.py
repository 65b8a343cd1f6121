"""``python -m winservice install|update|remove|start|stop|restart|debug``: pywin32's service command line."""

from __future__ import annotations

import sys

from workers.protocol import ExitCode


def main(argv: list[str] | None = None) -> int:
    try:
        import win32serviceutil

        from .service import NodeSupervisorService
    except ImportError as exc:
        print(f"node-supervisor: the Windows service needs Windows and pywin32 ({exc})", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    return int(win32serviceutil.HandleCommandLine(NodeSupervisorService, argv=argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
