"""`node-supervisor install-service [--dry-run] [--root DIR]`: the systemd unit for this checkout,
the config file it names, the user it runs as, and the llama.cpp wheels already built.

The unit is Type=notify with a watchdog (the daemon sends READY=1, STATUS=,
WATCHDOG=1, EXTEND_TIMEOUT_USEC=, RELOADING=1 and STOPPING=1), reloads
through `node-supervisor reload` (which waits for the verdict, so `systemctl
reload` fails on an invalid file), keeps exit code 78 from
restarting, and is hardened without hiding the GPU: /dev/nvidia* stay
reachable (no PrivateDevices).  systemd/node-supervisor.service is this
command's output for the default paths.

The unit's only argument is the config file, and the config file (written
when absent, never overwritten) names the state and data directories: the
command line reads the same file (/etc/node-supervisor/config.toml is its
last default path, ``--system`` its explicit one), so `node-supervisor
status` finds the service's socket without flags.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from ..config import SERVICE_CONFIG_FILE as SERVICE_CONFIG

SERVICE_USER = "node-supervisor"
SERVICE_STATE_DIR = Path("/var/lib/node-supervisor")
SERVICE_CACHE_DIR = Path("/var/cache/node-supervisor")
# Groups that own the GPU device files on common distributions (/dev/dri/* and, on some, /dev/nvidia*).
GPU_GROUPS = ("video", "render")

UNIT = """\
# node-supervisor as a system service (written by `node-supervisor install-service`).
#   configuration: {config} (state_dir, data_dir and everything else)
#   logs: journalctl -u node-supervisor -f   (JSON lines also in {state_dir}/logs)
[Unit]
Description=node-supervisor: local LLM inference workers
After=network.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} --config {config} run
ExecReload={exec_start} --config {config} reload
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
# The llama.cpp wheels install-service copied from the installing user's cache are found here.
Environment=XDG_CACHE_HOME={cache_dir}
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

CONFIG = """\
# node-supervisor: the system service's configuration (written by `node-supervisor install-service`
# because none was here; it never overwrites this file).  Reference: docs/CONFIG.md.
# After a change: systemctl reload node-supervisor
#
# The service keeps its environments, sockets and logs in state_dir and its models in data_dir.
# The command line reads this file too (its last default path, or `node-supervisor --system ...`),
# so `node-supervisor status` finds the service's socket without flags.
state_dir = "{state_dir}"
data_dir = "{state_dir}/data"

# log_level = "info"
# create_envs = true          # build missing engine environments at start (llama.cpp compiles once)

# Who may use the client socket: members of this group (usermod -aG {group} $USER, then log in again).
[security]
socket_group = "{group}"

# The OpenAI-compatible HTTP API (docs/HTTP.md) and the Prometheus exposition (docs/METRICS.md):
# [http]
# listen = "127.0.0.1:8080"
# [metrics]
# listen = "127.0.0.1:9464"

# Engines: leave them out for the defaults (llama.cpp on the default model; ExLlamaV2 too on a node
# with an NVIDIA driver).  A model fetched with `node-supervisor pull` lies in {state_dir}/data/models.
# [engines.llama]
# kind = "llamacpp"
# model = "{state_dir}/data/models/qwen2.5-0.5b-instruct-q4_k_m.gguf"
# n_ctx = 4096
"""


def render_unit(
    exec_start: str,
    user: str,
    config: str = str(SERVICE_CONFIG),
    state_dir: str = str(SERVICE_STATE_DIR),
    cache_dir: str = str(SERVICE_CACHE_DIR),
) -> str:
    return UNIT.format(exec_start=exec_start, user=user, config=config, state_dir=state_dir, cache_dir=cache_dir)


def render_config(state_dir: str = str(SERVICE_STATE_DIR), group: str = SERVICE_USER) -> str:
    return CONFIG.format(state_dir=state_dir, group=group)


def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def install_service(args: argparse.Namespace) -> int:
    root = Path(args.root or "/")
    exec_start = str(Path(sys.executable).parent / "node-supervisor")
    config = Path(args.unit_config) if args.unit_config else _under(root, SERVICE_CONFIG)
    state_dir, cache_dir = _under(root, SERVICE_STATE_DIR), _under(root, SERVICE_CACHE_DIR)
    user = args.user or SERVICE_USER
    unit = render_unit(exec_start, user, str(config), str(state_dir), str(cache_dir))
    if args.dry_run:
        print(unit, end="")
        return 0
    try:
        if args.user is None:
            ensure_system_user(user, state_dir)
        group = _primary_group(user) or user
        wrote_config = _write_config_if_absent(config, render_config(str(state_dir), group))
        copied = share_wheels(_installer_wheel_caches(), cache_dir / "node-supervisor" / "wheels", user)
        target = Path(args.unit_dir) if args.unit_dir else _under(root, Path("/etc/systemd/system"))
        target.mkdir(parents=True, exist_ok=True)
        (target / "node-supervisor.service").write_text(unit)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"node-supervisor: install-service: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {target / 'node-supervisor.service'} (runs as {user})")
    print(f"{'wrote' if wrote_config else 'kept the existing'} {config}")
    if copied:
        print(f"copied {copied} built wheel(s) into {cache_dir}: llama.cpp is not compiled again")
    print(
        "now run:\n  systemctl daemon-reload\n  systemctl enable --now node-supervisor\n  systemctl status node-supervisor"
    )
    print(f"to use it without sudo: usermod -aG {group} $USER (then log in again)")
    return 0


def ensure_system_user(name: str, home: Path) -> None:
    """A system user (and its own group) for the service, in the groups that own the GPU devices."""
    groups = gpu_groups()
    try:
        pwd.getpwnam(name)
    except KeyError:
        command = ["useradd", "--system", "--user-group", "--home-dir", str(home), "--no-create-home"]
        command += ["--shell", "/usr/sbin/nologin", "--comment", "node-supervisor service"]
        if groups:
            command += ["--groups", ",".join(groups)]
        subprocess.run([*command, name], check=True)
        return
    if groups:
        subprocess.run(["usermod", "--append", "--groups", ",".join(groups), name], check=True)


def gpu_groups() -> list[str]:
    """The groups of the GPU device files (other than root), and video/render where they exist."""
    names: set[str] = set()
    for pattern in ("nvidia*", "dri/*", "kfd"):
        for device in Path("/dev").glob(pattern):
            try:
                gid = device.stat().st_gid
                if gid != 0:
                    names.add(grp.getgrgid(gid).gr_name)
            except (OSError, KeyError):
                continue
    for name in GPU_GROUPS:
        try:
            grp.getgrnam(name)
            names.add(name)
        except KeyError:
            pass
    return sorted(names)


def _primary_group(user: str) -> str | None:
    try:
        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except KeyError:
        return None


def _write_config_if_absent(path: Path, text: str) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x") as handle:  # never over an administrator's file
            handle.write(text)
    except FileExistsError:
        return False
    return True


def _installer_wheel_caches() -> list[Path]:
    """The wheel caches of whoever installs: this process's, and the sudo caller's."""
    from ..node.builds import wheel_cache_root

    caches = [wheel_cache_root()]
    caller = os.environ.get("SUDO_USER")
    if caller:
        try:
            caches.append(Path(pwd.getpwnam(caller).pw_dir) / ".cache" / "node-supervisor" / "wheels")
        except KeyError:
            pass
    return caches


def share_wheels(sources: list[Path], target: Path, user: str) -> int:
    """Copy built wheels (one directory per build key) the service's cache lacks; the count copied."""
    copied = 0
    for source in sources:
        if not source.is_dir() or source.resolve() == target.resolve():
            continue
        for entry in sorted(source.iterdir()):
            destination = target / entry.name
            if ".tmp" in entry.name or destination.exists() or not any(entry.glob("*.whl")):
                continue
            shutil.copytree(entry, destination)
            copied += 1
    try:
        owner = pwd.getpwnam(user)
    except KeyError:
        return copied
    if copied and os.geteuid() == 0:
        for path in [target.parent.parent, target.parent, target, *target.rglob("*")]:
            os.chown(path, owner.pw_uid, owner.pw_gid)
    return copied
