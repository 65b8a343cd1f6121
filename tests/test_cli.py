"""The command line without a daemon: it gives up quickly and says why."""

from __future__ import annotations

import subprocess
import sys


def test_generate_with_no_daemon_socket_gives_up_at_once(tmp_path):
    """Not the 60 s per-event timeout, nor the 5 s connect timeout: no socket file means no daemon."""
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "--state-dir", str(tmp_path), "generate", "Hello"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 69, result
    assert "no daemon socket at" in result.stderr and "Traceback" not in result.stderr


def test_unknown_variable_is_named_by_client_commands(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "NODESUP_LOGLEVEL": "debug"}
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "--state-dir", str(tmp_path), "ping", "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert "NODESUP_LOGLEVEL is not a setting" in result.stderr, result.stderr
    assert result.returncode == 69
