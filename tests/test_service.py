"""`install-service` on a node: the unit, the config file it names, the user it runs as, the
wheels already built; and a daemon started by exactly the unit's ExecStart line serves."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path

from supervisor.client import Client
from supervisor.config import SERVICE_CONFIG_FILE, default_config_paths, load_settings

from .conftest import CLI, TEST_STATE, wait_until


def install(root: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "install-service", "--root", str(root), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def unit_lines(root: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (root / "etc/systemd/system/node-supervisor.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_the_unit_started_by_its_exact_execstart_line_serves_and_the_client_finds_it_by_the_config(shared_state):
    root = Path(tempfile.mkdtemp(prefix="ns-"))  # short: ipc socket paths are limited to about 100 characters
    result = install(root, "--user", "root")
    assert result.returncode == 0, result.stderr
    unit = unit_lines(root)
    config = root / "etc/node-supervisor/config.toml"
    assert config.is_file() and f"--config {config} run" in unit["ExecStart"][0]
    # The file the unit names exists and is valid as written: the state directory is the unit's.
    settings = load_settings(config)
    assert settings.state_dir == root / "var/lib/node-supervisor" and unit["ReadWritePaths"] == [
        str(settings.state_dir)
    ]
    # The administrator's edits (a fake engine, the shared environments) are kept by a second install.
    written = config.read_text()
    config.write_text(
        f'envs_dir = "{TEST_STATE / "envs"}"\ncreate_envs = false\n{written}\n[engines.f]\nkind = "fake"\n'
    )
    edited = config.read_text()
    assert install(root, "--user", "root").returncode == 0 and config.read_text() == edited
    environ = dict(os.environ)
    for assignment in unit["Environment"]:
        key, _, value = assignment.partition("=")
        environ[key] = value
    environ.pop("NOTIFY_SOCKET", None)
    daemon = subprocess.Popen(shlex.split(unit["ExecStart"][0]), env=environ, stderr=subprocess.PIPE)
    try:
        socket_file = Path((settings.client_endpoint or "")[len("ipc://") :])
        wait_until(lambda: socket_file.exists() or daemon.poll() is not None, 60, "the client socket bound")
        status = subprocess.run(
            [*CLI, "--config", str(config), "ping", "--timeout", "30"], capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0 and "pong" in status.stdout, (status, daemon.poll())
        with Client(settings.client_endpoint or "", timeout_s=30) as client:
            wait_until(lambda: client.status()["engines"][0]["state"] == "ready", 60, "the fake engine ready")
            assert client.complete(prompt="hi", max_tokens=3)["event"] == "done"
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0


def test_the_command_line_reads_the_service_config_by_default_and_with_service():
    assert default_config_paths()[-1] == SERVICE_CONFIG_FILE == Path("/etc/node-supervisor/config.toml")
    help_text = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "--service" in help_text


def test_install_service_creates_a_system_user_in_the_gpu_groups_and_shares_the_wheel_cache(tmp_path):
    """The user the unit runs as is made for it (useradd is a recording stand-in: this test must not add
    users to the machine); wheels built by the installing user are copied to the service's cache."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for tool in ("useradd", "usermod"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (bin_dir / tool).chmod(0o755)
    cache = tmp_path / "cache"
    wheel_dir = cache / "node-supervisor" / "wheels" / "0123456789abcdef"
    wheel_dir.mkdir(parents=True)
    (wheel_dir / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(b"wheel")
    root = tmp_path / "root"
    environ = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "XDG_CACHE_HOME": str(cache)}
    result = subprocess.run(
        [*CLI, "install-service", "--root", str(root)], capture_output=True, text=True, timeout=60, env=environ
    )
    assert result.returncode == 0, result.stderr
    recorded = calls.read_text()
    assert recorded.startswith("useradd --system --user-group") and recorded.rstrip().endswith("node-supervisor")
    assert unit_lines(root)["User"] == ["node-supervisor"]
    service_cache = Path(unit_lines(root)["Environment"][0].partition("=")[2])
    assert service_cache == root / "var/cache/node-supervisor"
    copied = service_cache / "node-supervisor" / "wheels" / "0123456789abcdef"
    assert (copied / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").read_bytes() == b"wheel"
    assert 'socket_group = "node-supervisor"' in (root / "etc/node-supervisor/config.toml").read_text()


def test_dry_run_writes_nothing(tmp_path):
    result = install(tmp_path, "--dry-run", "--user", "root")
    assert result.returncode == 0 and "ExecStart=" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_unit_runs_as_a_dedicated_user_not_root_by_default():
    result = subprocess.run([*CLI, "install-service", "--dry-run"], capture_output=True, text=True, timeout=30)
    assert "User=node-supervisor" in result.stdout and "User=root" not in result.stdout
