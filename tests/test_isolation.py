"""The daemon never loads an engine library; each worker runs its own environment's interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from .conftest import REPO

pytestmark = pytest.mark.real_engine


def mapped_files(pid: int) -> set[str]:
    """Every file mapped into a process: a loaded extension module or shared library shows here."""
    return {m.path for m in psutil.Process(pid).memory_maps(grouped=True)}


def test_daemon_process_has_neither_llama_cpp_nor_numpy(llama_daemon):
    status = llama_daemon.status()
    worker_pid = status["engines"][0]["workers"][0]["pid"]
    daemon_files = mapped_files(llama_daemon.process.pid)
    worker_files = mapped_files(worker_pid)
    # Positive control: the same check finds both in the worker.
    assert any("libllama" in f for f in worker_files)
    assert any("numpy" in f for f in worker_files)
    assert not any("libllama" in f or "llama_cpp" in f for f in daemon_files)
    assert not any("numpy" in f for f in daemon_files)


def test_worker_runs_its_own_environment_not_the_daemons(llama_daemon, shared_state):
    worker = llama_daemon.status()["engines"][0]["workers"][0]
    env = shared_state["envs_dir"] / "llamacpp"
    assert Path(worker["executable"]) == env / "bin" / "python"
    assert Path(worker["executable"]).parent.parent != Path(sys.prefix)
    # The worker's interpreter has llama_cpp; the daemon's cannot import it at all.
    probe = "import llama_cpp, numpy, sys; print(sys.prefix, numpy.__version__)"
    in_env = subprocess.run([worker["executable"], "-c", probe], capture_output=True, text=True)
    assert in_env.returncode == 0 and in_env.stdout.split()[0] == str(env)
    assert worker["versions"]["numpy"] == in_env.stdout.split()[1]
    in_daemon = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True, text=True)
    assert in_daemon.returncode != 0 and "No module named 'llama_cpp'" in in_daemon.stderr
    # NumPy may be installed beside the daemon (the `gguf` package needs it), but the daemon
    # never loads it: test_daemon_process_has_neither_llama_cpp_nor_numpy checks the running process.


def test_worker_runtime_imports_no_engine_and_no_daemon_code():
    code = (
        "import sys, workers.runtime, workers.engine, workers.protocol; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'torch', 'exllamav2', 'numpy', 'supervisor')]; "
        "print(bad)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_client_library_imports_only_pyzmq_and_the_protocol():
    code = (
        "import sys, supervisor.client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'pydantic_settings', 'structlog', 'psutil', 'numpy'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_envs_check_reports_interpreter_library_numpy_and_gpu_support(shared_state):
    import os

    environ = {
        **os.environ,
        "NODESUP_ENVS_DIR": str(shared_state["envs_dir"]),
        "NODESUP_STATE_DIR": str(shared_state["envs_dir"].parent),
    }
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "envs", "check", "llamacpp"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"interpreter   {shared_state['envs_dir'] / 'llamacpp' / 'bin' / 'python'}" in out
    assert "llama-cpp-python 0.3.36" in out and "numpy         2.3.5" in out
    # This machine has no GPU and the build has no GPU backend: said plainly, with the fix.
    assert "gpu offload   no; GPU backends built: none (CPU-only build)" in out
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in out
