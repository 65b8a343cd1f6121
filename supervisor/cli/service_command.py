"""`node-supervisor install-service [--dry-run]`: the systemd unit for this checkout.

The unit is Type=notify with a watchdog (the daemon sends READY=1, STATUS=,
WATCHDOG=1, EXTEND_TIMEOUT_USEC=, RELOADING=1 and STOPPING=1), reloads
through `node-supervisor reload` (which waits for the verdict, so `systemctl
reload` fails on an invalid file), keeps exit code 78 from
restarting, and is hardened without hiding the GPU: /dev/nvidia* stay
reachable (no PrivateDevices).  systemd/node-supervisor.service is this
command's output for the default paths.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

UNIT = """\
# node-supervisor as a system service (written by `node-supervisor install-service`).
#   logs: journalctl -u node-supervisor -f   (JSON lines also in {state_dir}/logs)
[Unit]
Description=node-supervisor: local LLM inference workers
After=network.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} --config {config} --state-dir {state_dir} --data-dir {state_dir}/data run
ExecReload={exec_start} --config {config} --state-dir {state_dir} --data-dir {state_dir}/data reload
User={user}
# READY=1 comes once an engine can generate; environment builds and model loads extend the start.
TimeoutStartSec=300
WatchdogSec=30
# The daemon stops its workers in order on SIGTERM (shutdown message, grace,
# SIGTERM, SIGKILL); KillMode=mixed lets it, and kills any straggler after the timeout.
KillMode=mixed
TimeoutStopSec=30
# Descriptors: HTTP holds at most twice [http] max_connections (1,024) and never the last fd_reserve (256);
# the rest serve ZeroMQ clients (one each), workers' pipes and sockets and the logs (docs/HTTP.md, "Limits").
LimitNOFILE=16384
Restart=on-failure
RestartSec=2
# Exit 78 is a configuration error: restarting will not fix it.
RestartPreventExitStatus=78
StateDirectory=node-supervisor
RuntimeDirectory=node-supervisor
CacheDirectory=node-supervisor
Environment=XDG_CACHE_HOME=/var/cache/node-supervisor
# Hardening that keeps the GPU reachable: no PrivateDevices, so /dev/nvidia* stay visible.
ProtectSystem=strict
ReadWritePaths={state_dir}
PrivateTmp=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes

[Install]
WantedBy=multi-user.target
"""


def render_unit(
    exec_start: str,
    user: str,
    config: str = "/etc/node-supervisor/config.toml",
    state_dir: str = "/var/lib/node-supervisor",
) -> str:
    return UNIT.format(exec_start=exec_start, user=user, config=config, state_dir=state_dir)


def install_service(args: argparse.Namespace) -> int:
    exec_start = str(Path(sys.executable).parent / "node-supervisor")
    unit = render_unit(exec_start, args.user or getpass.getuser(), args.unit_config)
    if args.dry_run:
        print(unit, end="")
        return 0
    target = Path(args.unit_dir) / "node-supervisor.service"
    target.write_text(unit)
    print(
        f"wrote {target}\nnow run:\n  systemctl daemon-reload\n  systemctl enable --now node-supervisor\n  systemctl status node-supervisor"
    )
    return 0
