"""The worker loads its engine library before pyzmq.

A CUDA build of llama.cpp crashed (SIGSEGV in ``llama_model::print_info``)
when a ZeroMQ context existed before llama_cpp was loaded, so the worker
imports its engine module first and pyzmq only afterwards.  These tests run
fresh interpreters of the fake engine's environment with this checkout's
workers/ on PYTHONPATH.  (``-X importtime`` cannot tell: it does not see the
engine module, which is imported with importlib.import_module.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from workers import protocol as p

from .conftest import REPO
from .test_worker_protocol import fake_env_python, worker_environ

# Installed as sitecustomize: a finder first on sys.meta_path sees every
# import that is not already done, before it starts, and writes down its name
# and whether the engine module (workers.fake) had finished importing then.
RECORDER = """
import os, sys

class ImportRecorder:
    def __init__(self, path):
        self.out = open(path, "w", buffering=1)  # line by line: the worker may leave with os._exit

    def find_spec(self, name, path=None, target=None):
        engine = sys.modules.get("workers.fake")
        done = engine is not None and not getattr(engine.__spec__, "_initializing", False)
        self.out.write(f"{name} {int(done)}\\n")
        return None

sys.meta_path.insert(0, ImportRecorder(os.environ["IMPORT_ORDER_LOG"]))
"""


def run_recorded_worker(directory: Path) -> list[tuple[str, bool]]:
    """Run the fake worker under the recorder; (module, engine module done) per import, in order.

    Nothing listens at the endpoint: the worker sends its hello into the
    void, hears no heartbeat and exits as an orphan after 3 intervals.
    """
    (directory / "sitecustomize.py").write_text(RECORDER)
    log = directory / "imports.log"
    command = [
        str(fake_env_python()),
        "-m",
        "workers",
        "--engine",
        "fake",
        "--endpoint",
        f"ipc://{directory}/nobody.sock",
        "--worker-id",
        "w.1",
        "--heartbeat-interval",
        "0.2",
    ]
    environ = worker_environ("x")
    environ.update(PYTHONPATH=f"{directory}{os.pathsep}{REPO}", IMPORT_ORDER_LOG=str(log))
    result = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=120)
    assert result.returncode == p.ExitCode.ORPHANED, result.stderr[-3000:]
    return [(name, flag == "1") for name, flag in (line.split() for line in log.read_text().splitlines())]


def test_the_engine_module_is_imported_before_any_zmq_module() -> None:
    with tempfile.TemporaryDirectory(prefix="wio-") as directory:
        imports = run_recorded_worker(Path(directory))
    names = [name for name, _ in imports]
    assert "workers.fake" in names and "workers.runtime" in names, names
    first_zmq = next(i for i, name in enumerate(names) if name == "zmq" or name.startswith("zmq."))
    assert imports[first_zmq][1], f"zmq imported before workers.fake was loaded: {names[: first_zmq + 1]}"


def test_what_runs_before_the_engine_imports_no_zmq_and_the_runtime_no_engine() -> None:
    code = (
        "import sys, workers.__main__, workers.engine, workers.process, workers.protocol; "
        "before = sorted(m for m in sys.modules if m.split('.')[0] == 'zmq'); "
        "import workers.runtime; "
        "engines = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('llama_cpp', 'torch', 'exllamav2', 'numpy', 'supervisor') or m == 'workers.fake'); "
        "print(before, engines)"
    )
    for python in (sys.executable, str(fake_env_python())):
        environ = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=environ, cwd=REPO, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[] []", (python, result.stdout)
