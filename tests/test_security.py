"""Who may connect: CURVE on tcp endpoints (a real daemon, real sockets), file modes and a
group on ipc endpoints, and the `keys` command that manages the authorized clients."""

from __future__ import annotations

import os
import socket
import stat
import subprocess

import pytest
import zmq

from supervisor.cli import main
from supervisor.client import Client, ClientRefused, ClientTimeout, CurveKeys
from supervisor.config import load_settings
from supervisor.node.keys import local_curve
from tests.conftest import CLI, fake_engine

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this pyzmq has no CURVE support")
REFUSAL_WAIT_S = 3.0  # how long a refused client waits for the answer that never comes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tcp_endpoints() -> dict[str, str]:
    return {f"{name}_endpoint": f"tcp://127.0.0.1:{free_port()}" for name in ("client", "worker", "events")}


def cli(daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--config", str(daemon.config_path), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def tcp_daemon(make_daemon, tmp_path):
    engine, _ = fake_engine(tmp_path)
    return make_daemon({"f": engine}, **tcp_endpoints())


def test_tcp_endpoints_answer_authorized_keys_only(tcp_daemon):
    # The fake worker reached ready over the tcp worker endpoint: it passed CURVE with the keys it was spawned with.
    with tcp_daemon.client(timeout_s=30) as client:
        assert client.ping()["event"] == "pong"
        assert client.complete("hello", max_tokens=4)["event"] == "done"
    # Its keys came in its environment, and left it before engine code ran.
    assert tcp_daemon.engine("f")["workers"][0]["versions"]["sees_worker_curve"] is False
    server_public = tcp_daemon.curve().server_public

    stranger_public, stranger_secret = zmq.curve_keypair()
    with Client(
        tcp_daemon.endpoint, timeout_s=REFUSAL_WAIT_S, curve=CurveKeys(server_public, stranger_public, stranger_secret)
    ) as stranger:
        with pytest.raises(ClientRefused, match="not among the authorized keys"):
            stranger.ping()
    with Client(
        tcp_daemon.endpoint, timeout_s=REFUSAL_WAIT_S
    ) as plain:  # no CURVE at all: the handshake cannot even start
        with pytest.raises(ClientTimeout):
            plain.ping()
    # The worker endpoint has a domain of its own: an authorized client key does not open it.
    worker_endpoint = load_settings(tcp_daemon.config_path).worker_endpoint
    with Client(worker_endpoint, timeout_s=REFUSAL_WAIT_S, curve=tcp_daemon.curve()) as intruder:
        with pytest.raises(ClientRefused):
            intruder.ping()
    assert stranger_public.decode() in tcp_daemon.log_text()
    with tcp_daemon.client(timeout_s=30) as client:  # the refusals changed nothing for the authorized
        assert client.ping()["event"] == "pong"


def test_keys_added_and_removed_count_from_the_next_connection(tcp_daemon):
    settings = load_settings(tcp_daemon.config_path)
    made = cli(tcp_daemon, "keys", "new", "alice")
    assert made.returncode == 0, made.stderr
    secret_file = settings.security.keys_dir / "clients" / "alice.key_secret"
    assert str(secret_file) in made.stdout
    alice = CurveKeys.from_files(settings.security.server_key_file, secret_file)
    with Client(tcp_daemon.endpoint, timeout_s=30, curve=alice) as client:
        assert client.ping()["event"] == "pong"

    assert cli(tcp_daemon, "keys", "remove", "alice").returncode == 0
    with Client(tcp_daemon.endpoint, timeout_s=REFUSAL_WAIT_S, curve=alice) as client:
        with pytest.raises(ClientRefused):
            client.ping()

    bob_public, bob_secret = zmq.curve_keypair()
    assert cli(tcp_daemon, "keys", "add", "bob", bob_public.decode()).returncode == 0
    with Client(
        tcp_daemon.endpoint, timeout_s=30, curve=CurveKeys(alice.server_public, bob_public, bob_secret)
    ) as client:
        assert client.ping()["event"] == "pong"

    shown = cli(tcp_daemon, "keys")
    assert shown.returncode == 0, shown.stderr
    assert f"server public key: {alice.server_public.decode()}" in shown.stdout
    listed = {line.split()[0]: line.split()[1] for line in shown.stdout.splitlines() if line.startswith("  ")}
    assert listed == {"bob": bob_public.decode(), "local": tcp_daemon.curve().public.decode()}

    assert cli(tcp_daemon, "keys", "remove", "local").returncode == 0
    refused = cli(tcp_daemon, "ping", "--timeout", str(REFUSAL_WAIT_S))
    assert refused.returncode == 69 and "refused this client's key" in refused.stderr, refused.stderr


def test_cli_generate_and_events_over_tcp_with_the_nodes_own_keys(tcp_daemon):
    generated = cli(tcp_daemon, "generate", "hello", "--max-tokens", "4")
    assert generated.returncode == 0, generated.stderr
    assert "[length: 4 tokens" in generated.stderr
    watched = cli(tcp_daemon, "events", "--topic", "feed.", "--count", "1", "--timeout", "30")
    assert watched.returncode == 0 and "watching tcp://127.0.0.1:" in watched.stderr, watched.stderr


def test_keys_command_files_modes_and_refusals(tmp_path, capsys):
    state = tmp_path / "state"
    assert main(["--state-dir", str(state), "keys", "new", "alice"]) == 0
    keys_dir = state / "keys"
    modes = {
        path: stat.S_IMODE(path.stat().st_mode) for path in (keys_dir, keys_dir / "authorized", keys_dir / "clients")
    }
    if os.name == "posix":
        assert set(modes.values()) == {0o700}
        assert stat.S_IMODE((keys_dir / "clients" / "alice.key_secret").stat().st_mode) == 0o600
    assert (
        main(["--state-dir", str(state), "keys"]) == 0
    )  # makes the daemon's pair, which the daemon would make at start
    if os.name == "posix":
        assert stat.S_IMODE((keys_dir / "server.key_secret").stat().st_mode) == 0o600
    alice_public = (keys_dir / "authorized" / "alice.key").read_text()
    capsys.readouterr()

    other_public, _ = zmq.curve_keypair()
    assert main(["--state-dir", str(state), "keys", "add", "alice", other_public.decode()]) == 78
    assert "already authorized with another key" in capsys.readouterr().err
    assert main(["--state-dir", str(state), "keys", "add", "bad", "x" * 39]) == 78
    assert "neither a public key" in capsys.readouterr().err
    assert main(["--state-dir", str(state), "keys", "add", "../escape", other_public.decode()]) == 78
    assert "key name" in capsys.readouterr().err
    assert main(["--state-dir", str(state), "keys", "remove", "nobody"]) == 78
    assert (keys_dir / "authorized" / "alice.key").read_text() == alice_public
    # A key file can be given instead of the key: here alice's own public file, under a second name, is refused as a duplicate.
    assert main(["--state-dir", str(state), "keys", "add", "alias", str(keys_dir / "clients" / "alice.key")]) == 78
    assert "already authorized under another name" in capsys.readouterr().err
    carol = tmp_path / "carol.key"
    carol.write_text(f'curve\n    public-key = "{other_public.decode()}"\n')
    assert main(["--state-dir", str(state), "keys", "add", "carol", str(carol)]) == 0
    assert local_curve(load_settings(None, {"state_dir": state}), "ipc:///any") is None  # ipc needs no keys


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="giving files to another user needs root")
def test_keys_made_by_root_belong_to_the_owner_of_the_state_directory(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)  # the daemon's user, as `sudo node-supervisor keys new` finds it
    assert main(["--state-dir", str(state), "keys", "new", "alice"]) == 0
    assert main(["--state-dir", str(state), "keys"]) == 0
    made = [state / "keys", *(state / "keys").rglob("*")]
    assert len(made) == 8  # keys/, authorized/, clients/, server pair, alice's pair, alice's authorized key
    assert {(path.stat().st_uid, path.stat().st_gid) for path in made} == {(65534, 65534)}


def test_client_without_keys_is_told_what_is_missing(tmp_path, capsys):
    state = tmp_path / "state"
    code = main(
        ["--state-dir", str(state), "--client-endpoint", f"tcp://127.0.0.1:{free_port()}", "ping", "--timeout", "1"]
    )
    assert code == 78
    assert "security.server_key_file" in capsys.readouterr().err


def _group_to_give() -> tuple[str, int]:
    """A group this user may give files to, other than its own where it can (root: any group)."""
    import grp

    own = os.getegid()
    others = [g.gr_gid for g in grp.getgrall()] if os.geteuid() == 0 else os.getgroups()
    gid = next((g for g in others if g != own), own)
    return grp.getgrgid(gid).gr_name, gid


@pytest.mark.skipif(os.name != "posix", reason="ipc sockets, file modes and groups are POSIX")
def test_ipc_run_directory_0750_sockets_0660_in_the_socket_group(make_daemon, tmp_path):
    group, gid = _group_to_give()
    engine, _ = fake_engine(tmp_path)
    daemon = make_daemon({"f": engine}, security={"socket_group": group})
    assert daemon.client(timeout_s=30).ping()["event"] == "pong"
    run_dir = daemon.state_dir / "run"
    assert (stat.S_IMODE(run_dir.stat().st_mode), run_dir.stat().st_gid) == (0o750, gid)
    for name in ("client.sock", "workers.sock", "events.sock"):
        info = (run_dir / name).stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, gid), name
    assert not (daemon.state_dir / "keys").exists()  # no tcp endpoint, no keys


@pytest.mark.skipif(os.name != "posix", reason="groups are POSIX")
@pytest.mark.parametrize(
    "group, message",
    [("no-such-group-nodesup", "no group named 'no-such-group-nodesup'"), ("", "at least 1 character")],
)
def test_socket_group_that_cannot_be_used_stops_the_start_naming_the_key(tmp_path, group, message):
    environ = {**os.environ, "NODESUP_SECURITY__SOCKET_GROUP": group}
    result = subprocess.run(
        [*CLI, "--state-dir", str(tmp_path / "state"), "run", "--no-create-envs"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )
    assert result.returncode == 78
    assert "security.socket_group" in result.stderr and message in result.stderr
    assert not (tmp_path / "state" / "run").exists()  # refused before anything was bound


def test_worker_takes_its_curve_keys_out_of_its_environment(monkeypatch):
    from workers.process import take_curve_keys
    from workers.protocol import WORKER_CURVE_ENV

    keys = [zmq.curve_keypair()[0].decode(), *(k.decode() for k in zmq.curve_keypair())]
    monkeypatch.setenv(WORKER_CURVE_ENV, " ".join(keys))
    assert take_curve_keys() == tuple(keys)
    assert WORKER_CURVE_ENV not in os.environ  # engine code started later cannot read it
    assert take_curve_keys() is None
