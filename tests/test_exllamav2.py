"""The ExLlamaV2 engine in its own environment, on a machine without CUDA, and NumPy isolation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import LLAMA, collect

pytestmark = pytest.mark.real_engine

EXL2 = {"kind": "exllamav2", "priority": 5}  # preferred, so the fallback is really exercised


def cuda_in_exl2_env(shared_state) -> bool:
    python = shared_state["envs_dir"] / "exllamav2" / "bin" / "python"
    result = subprocess.run(
        [str(python), "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True
    )
    return result.stdout.strip() == "True"


def test_without_cuda_the_worker_reports_unavailable_once_and_llama_serves(make_daemon, shared_state):
    if cuda_in_exl2_env(shared_state):
        pytest.skip("this machine has CUDA: the unavailable path cannot be shown here")
    daemon = make_daemon({"exl2": EXL2, "llama": LLAMA}, heartbeat_interval_s=0.3)
    status = daemon.wait_for(lambda s: s["engines"][0]["state"] == "engine_unavailable", timeout=60)
    exl2 = status["engines"][0]
    assert exl2["name"] == "exl2" and "no CUDA" in exl2["reason"], exl2
    worker = exl2["workers"][0]
    assert worker["last_exit"]["exit_code"] == 69 and worker["load_failure"]["code"] == "unavailable"
    _, done = collect(daemon.client().generate(prompt="Hello", max_tokens=4))
    assert done["event"] == "done" and done["engine"] == "llama"
    _, pinned = collect(daemon.client().generate(prompt="Hello", max_tokens=4, engine="exl2"))
    assert pinned["code"] == "engine_unavailable" and "no CUDA" in pinned["message"]
    exl2 = daemon.engine("exl2")
    # "failed" is terminal: the supervisor has no path from it back to a start, so no restart can follow.
    assert exl2["workers"][0]["state"] == "failed", exl2["workers"][0]
    assert exl2["workers"][0]["restarts"] == 0 and exl2["workers"][0]["id"] == "exl2.1"
    started = [line for line in daemon.log_text().splitlines() if '"worker started"' in line and '"exl2"' in line]
    assert len(started) == 1, "the worker was started exactly once"


def test_each_worker_reports_its_own_numpy_and_the_daemon_has_neither_stack(make_daemon):
    daemon = make_daemon({"exl2": EXL2, "llama": LLAMA})
    status = daemon.wait_for(lambda s: all(e["workers"][0]["packages"] for e in s["engines"]), timeout=60)
    packages = {e["name"]: e["workers"][0]["packages"] for e in status["engines"]}
    # Two NumPy versions that cannot live in one environment, installed at once.
    assert packages["llama"]["numpy"] == "2.3.5" and packages["exl2"]["numpy"] == "1.26.4"
    assert packages["llama"]["llama-cpp-python"] == "0.3.36" and packages["llama"]["torch"] is None
    assert packages["exl2"]["torch"].startswith("2.13.0") and packages["exl2"]["llama-cpp-python"] is None
    executables = {e["name"]: e["workers"][0]["executable"] for e in status["engines"]}
    assert executables["llama"] != executables["exl2"] != sys.executable
    for module in ("torch", "llama_cpp", "numpy"):
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        assert result.returncode != 0, f"the daemon's environment can import {module}"


def test_a_configured_exllamav2_engine_without_cuda_reports_unavailable_and_llama_serves(make_daemon, shared_state):
    if cuda_in_exl2_env(shared_state):
        pytest.skip("this machine has CUDA: ExLlamaV2 is not unavailable here")
    # What the defaults were before they fitted the node: an ExLlamaV2 engine configured on a node without CUDA.
    daemon = make_daemon(
        {"llama": {"kind": "llamacpp", "priority": 10}, "exllamav2": {"kind": "exllamav2", "priority": 20}}
    )
    status = daemon.wait_for(
        lambda s: any(e["name"] == "exllamav2" and e["state"] == "engine_unavailable" for e in s["engines"]), timeout=60
    )
    assert [e["name"] for e in status["engines"]] == ["llama", "exllamav2"]
    exl2 = next(e for e in status["engines"] if e["name"] == "exllamav2")
    assert "no CUDA" in exl2["reason"]
    _, done = collect(daemon.client().generate(prompt="Hello", max_tokens=4))
    assert done["event"] == "done" and done["engine"] == "llama"
