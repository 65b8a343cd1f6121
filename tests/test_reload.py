"""Reloading the configuration while serving.

The first part drives the core in-process (tests/core_harness.py): which
engines drain and restart, where waiting requests go, that each request
ends exactly once.  The second part reloads a real daemon under load.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import threading

import pytest

from supervisor.client import Client
from supervisor.core.lifecycle import WorkerState
from supervisor.core.errors import Refused
from workers import protocol as p
from workers.protocol import messages as m

from .conftest import CLI, assert_nothing_after, fake_engine, wait_until
from .core_harness import Core, hello

FAKE = {"kind": "fake"}


def _ends(core: Core, *ids: str) -> dict[str, list[dict]]:
    return {rid: core.terminal(rid) for rid in ids}


def test_a_changed_engine_finishes_its_request_then_restarts_with_the_new_settings_while_the_other_serves():
    core = Core({"a": {**FAKE, "priority": 1}, "b": {**FAKE, "priority": 2}})
    core.supervisor.start(core.now)
    core.bring_up("a"), core.bring_up("b")
    core.submit("running")
    core.submit("waiting-unpinned")
    core.submit("waiting-pinned", engine="a")
    changes = core.reload({"a": {**FAKE, "priority": 1, "n_ctx": 4096}, "b": {**FAKE, "priority": 2}})
    assert (changes.restarted, changes.unchanged) == (["a"], ["b"])
    # The unpinned request goes to b, which serves now; the pinned one waits for a's new worker.
    assert [m["prompt"] for m in core.effects.worker_messages("b.1", m.Generate.TYPE)] == ["hi"]
    assert core.effects.named("stop") == []  # a's worker is still generating
    core.tokens("a", 2)
    core.finish_current("a")
    assert core.terminal("running")[0]["event"] == "done"
    assert core.effects.named("stop") == ["a.1"]  # stopped once idle; nothing more was given to it
    assert len(core.effects.worker_messages("a.1", m.Generate.TYPE)) == 1
    core.exit("a", 0)
    assert core.effects.named("start")[-1] == "a.2"
    core.supervisor.on_hello(core.engine("a"), hello(2), core.now)
    assert core.effects.worker_messages("a.2", m.Load.TYPE)[0]["spec"]["n_ctx"] == 4096
    core.supervisor.on_ready(core.engine("a"), m.Ready(model={}), core.now)
    assert core.effects.worker_messages("a.2", m.Generate.TYPE)[0]["prompt"] == "hi"
    core.finish_current("a")
    core.finish_current("b")
    assert all(
        len(events) == 1 and events[0]["event"] == "done"
        for events in _ends(core, "running", "waiting-unpinned", "waiting-pinned").values()
    )
    assert core.engine("a").worker.restarts == 0  # a planned restart, not a failure


def test_settings_that_do_not_touch_the_load_are_applied_in_place_and_can_move_traffic():
    core = Core({"a": {**FAKE, "priority": 1}, "b": {**FAKE, "priority": 2}})
    core.supervisor.start(core.now)
    core.bring_up("a"), core.bring_up("b")
    changes = core.reload({"a": {**FAKE, "priority": 3, "max_queue": 2}, "b": {**FAKE, "priority": 2}})
    assert changes.updated == ["a"] and changes.restarted == []
    assert core.effects.named("stop") == []
    assert core.engine("a").config.max_queue == 2
    core.submit("r1")
    assert core.terminal("r1") == [] and core.current("b").id == "r1"  # b is first by priority now


def test_a_removed_engine_drains_and_goes_its_pinned_waiters_end_with_unknown_engine():
    core = Core({"a": {**FAKE, "priority": 1}, "b": {**FAKE, "priority": 2}})
    core.supervisor.start(core.now)
    core.bring_up("a"), core.bring_up("b")
    core.submit("running", engine="b")
    core.submit("pinned", engine="b")
    changes = core.reload({"a": {**FAKE, "priority": 1}})
    assert changes.removed == ["b"]
    (pinned,) = core.terminal("pinned")
    assert pinned["code"] == p.ErrorCode.UNKNOWN_ENGINE and "removed" in pinned["message"]
    with pytest.raises(Refused) as refused:
        core.submit("late", engine="b")
    assert refused.value.code == p.ErrorCode.UNKNOWN_ENGINE
    core.tokens("b", 1)
    core.finish_current("b")
    assert core.terminal("running")[0]["event"] == "done"
    assert core.effects.named("stop") == ["b.1"]
    core.exit("b", 0)
    assert list(core.engines.by_name) == ["a"]
    core.advance(120)  # no restart, no probe for the engine that went
    assert core.effects.named("start") == ["a.1", "b.1"]


def test_an_added_warm_engine_starts_and_an_idle_changed_one_restarts_at_once():
    core = Core({"a": {**FAKE, "priority": 1}})
    core.supervisor.start(core.now)
    core.bring_up("a")
    core.reload({"a": {**FAKE, "priority": 1, "options": {"delay_s": 0.1}}, "c": {**FAKE, "priority": 5}})
    assert core.effects.named("stop") == ["a.1"]
    assert core.effects.named("start") == ["a.1", "c.1"]
    core.exit("a", 0)
    assert core.effects.named("start")[-1] == "a.2"


def test_a_changed_engine_that_had_failed_gets_a_fresh_start():
    core = Core({"a": FAKE})
    core.supervisor.start(core.now)
    core.exit("a", p.ExitCode.UNAVAILABLE)
    assert core.engine("a").worker.state is WorkerState.FAILED
    core.reload({"a": {**FAKE, "n_ctx": 1024}})
    assert core.engine("a").refusal is None
    assert core.effects.named("start") == ["a.1", "a.2"]


def test_what_a_reload_changes_is_reported_and_fixed_settings_keep_their_running_values():
    core = Core({"a": FAKE})
    changes = core.reload({"a": FAKE}, client_endpoint="ipc:///tmp/other.sock", supervision={"circuit_failures": 7})
    assert changes.needs_restart == ["client_endpoint"] and changes.applied == ["supervision"]
    assert core.settings.client_endpoint != "ipc:///tmp/other.sock"
    assert core.engine("a").breaker.threshold == 7 and core.supervisor.config.circuit_failures == 7


# --- a real daemon, reloaded under load ------------------------------------------------


class Load:
    """Client threads sending requests in a loop (pinned to an engine or not) until stopped;
    every request's events are kept, to count its terminal events."""

    def __init__(self, daemon, targets: list[str | None]) -> None:
        self.daemon = daemon
        self.stop = threading.Event()
        self.ends: dict[str, list[dict]] = {}
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i, target), daemon=True) for i, target in enumerate(targets)
        ]

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a client thread never got its answer"

    def _run(self, index: int, engine: str | None) -> None:
        try:
            with Client(self.daemon.endpoint, timeout_s=30) as client:
                for n in itertools.count():
                    if self.stop.is_set():
                        return
                    rid = f"t{index}-{n}"
                    fields = {"engine": engine} if engine else {}
                    events = list(client.generate(prompt="hi", max_tokens=6, id=rid, **fields))
                    assert_nothing_after(client, rid)
                    self.ends[rid] = [e for e in events if e["event"] in p.TERMINAL_EVENTS]
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def served_by(self, engine: str) -> int:
        return sum(1 for ends in self.ends.values() if ends and ends[-1].get("engine") == engine)


def _worker_pid(daemon, name: str) -> int | None:
    workers = daemon.engine(name)["workers"]
    return workers[0]["pid"] if workers else None


def test_reloading_under_load_restarts_only_what_changed_and_every_request_ends_exactly_once(make_daemon, tmp_path):
    a, _ = fake_engine(tmp_path, "a", priority=10)
    b, _ = fake_engine(tmp_path, "b", priority=20)
    daemon = make_daemon({"a": a, "b": b})
    pid_a, pid_b = _worker_pid(daemon, "a"), _worker_pid(daemon, "b")
    with Load(daemon, [None, None, "a", "b"]) as load:
        wait_until(lambda: load.served_by("a") >= 5 and load.served_by("b") >= 5, 30, "both engines serving")
        # 1. a's load settings change (the reload op): a drains and restarts, b keeps its worker.
        daemon.write_config({"a": {**a, "n_ctx": 1024}, "b": b})
        with daemon.client(timeout_s=10) as admin:
            reply = admin.reload()
        assert reply["event"] == p.EVENT_RELOADED and reply["restarted"] == ["a"] and reply["unchanged"] == ["b"], reply
        daemon.wait_for(lambda s: _ready_with_new_pid(s, "a", pid_a))
        served = load.served_by("a")
        wait_until(lambda: load.served_by("a") > served + 5, 30, "a serving again after its restart")
        assert _worker_pid(daemon, "b") == pid_b
        # 2. SIGHUP: c is added, b removed; b's pinned client gets unknown_engine from then on.
        daemon.write_config({"a": {**a, "n_ctx": 1024}, "c": {**b, "priority": 30}})
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for(
            lambda s: (
                [e["name"] for e in s["engines"]] == ["a", "c"] and all(e["state"] == "ready" for e in s["engines"])
            )
        )
        wait_until(
            lambda: any(e and e[-1].get("code") == p.ErrorCode.UNKNOWN_ENGINE for e in list(load.ends.values())),
            30,
            "b refused",
        )
        # 3. An invalid file: refused with the key named, nothing changes.
        daemon.write_config({"a": {**a, "n_ctx": -1}, "c": b})
        with daemon.client(timeout_s=10) as admin:
            refused = admin.reload()
        assert refused["code"] == p.ErrorCode.INVALID_CONFIG and "engines.a.n_ctx" in refused["message"], refused
        served = load.served_by("a")
        wait_until(lambda: load.served_by("a") > served + 5, 30, "a still serving after the refused reload")
    assert not load.errors, load.errors
    assert all(len(ends) == 1 for ends in load.ends.values()), [r for r, e in load.ends.items() if len(e) != 1]
    failures = {e[0].get("code") for e in load.ends.values() if e[0]["event"] == p.EVENT_ERROR}
    assert failures <= {p.ErrorCode.UNKNOWN_ENGINE}, failures  # only requests naming the removed engine
    assert len(load.ends) > 60
    log = daemon.log_text()
    assert "configuration reload refused" in log and "engines.a.n_ctx" in log


def _ready_with_new_pid(status: dict, name: str, old_pid: int | None) -> bool:
    engine = next(e for e in status["engines"] if e["name"] == name)
    return engine["state"] == "ready" and bool(engine["workers"]) and engine["workers"][0]["pid"] not in (None, old_pid)


def test_reload_from_the_command_line_says_what_changed_and_exits_78_on_an_invalid_file(make_daemon, tmp_path):
    a, _ = fake_engine(tmp_path, "a")
    daemon = make_daemon({"a": a})
    cli = [*CLI, "--config", str(daemon.config_path), "reload"]
    daemon.write_config({"a": {**a, "priority": 5}}, max_tokens_limit=100)
    ok = subprocess.run(cli, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "updated in place: a" in ok.stdout and "needs a daemon restart to change: max_tokens_limit" in ok.stdout, (
        ok.stdout
    )
    assert daemon.engine("a")["priority"] == 5
    daemon.write_config({"a": {**a, "max_queue": "many"}})
    bad = subprocess.run(cli, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 78, (bad.stdout, bad.stderr)
    assert "engines.a.max_queue" in bad.stderr and "keeps its configuration" in bad.stderr
    assert daemon.engine("a")["priority"] == 5 and daemon.engine("a")["state"] == "ready"
