"""Cancel means cancel: Ctrl-C on `generate` stops the generation in both modes, and a client that
goes away ends its requests as cancelled (not failed), with a log line that says so."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
import zmq

from .conftest import CLI, wait_until

SLOW = {"kind": "fake", "priority": 10, "options": {"token_delay_s": 0.2}}


def request_ends(daemon) -> list[dict]:
    lines = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request end"]


@pytest.mark.parametrize("mode", [["--no-stream"], []], ids=["no-stream", "stream"])
def test_ctrl_c_on_generate_cancels_the_request_in_both_modes(make_daemon, mode):
    """With --no-stream (no event before the end) and streaming before the first token alike."""
    daemon = make_daemon({"f": {**SLOW, "options": {"token_delay_s": 30.0}}})
    command = [*CLI, "--config", str(daemon.config_path), "generate", "Hello", "--max-tokens", "1000", *mode]
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: daemon.engine("f")["in_flight"] == 1, 30, "the request running")
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=30)
    assert cli.returncode == 130 and "[cancelled]" in err and "Traceback" not in err, err
    engine = daemon.wait_for(lambda s: s["engines"][0]["in_flight"] == 0, 30)["engines"][0]
    assert engine["cancelled"] == 1 and engine["failed"] == 0, engine
    (end,) = request_ends(daemon)
    assert end["finish_reason"] == "cancelled" and end["tokens"] <= 2, end  # not run on to 1,000


def test_a_client_that_goes_away_ends_its_request_as_cancelled_with_an_honest_log_line(make_daemon):
    daemon = make_daemon({"f": SLOW})
    context = zmq.Context()
    gone = context.socket(zmq.DEALER)
    gone.setsockopt(zmq.LINGER, 0)
    gone.connect(daemon.endpoint)
    gone.send(json.dumps({"op": "generate", "id": "leaves", "prompt": "x", "max_tokens": 1000}).encode())
    gone.recv()  # the first token: then the client is gone
    gone.close()
    context.term()
    wait_until(lambda: request_ends(daemon), 60, "the request's end")
    (end,) = request_ends(daemon)
    assert end["outcome"] == "done" and end["finish_reason"] == "cancelled" and end["tokens"] < 100, end
    engine = daemon.wait_for(lambda s: s["engines"][0]["in_flight"] == 0, 30)["engines"][0]  # the worker stopped
    assert engine["failed"] == 0 and engine["cancelled"] == 1, engine
    log = daemon.log_text()
    assert "client went away" in log
    assert "unreachable" not in log and "client_gone" not in log
