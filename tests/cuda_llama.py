"""What the cuda-marked tests of the llama.cpp worker run on, or a skip that names what is missing.

A skip only for missing hardware: no NVIDIA GPU that NVML can see.  On a
machine with one, a llama.cpp environment that is not a CUDA build, or no
model, fails the test with what to do (``make gpu-check`` builds the
environment as the node chooses and makes a model; shared/gpu/README.md).

The model: ``CUDA_TEST_GGUF``, else the test state's default model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor.node.envs import env_python, read_marker
from supervisor.node.models import default_model_path
from supervisor.planning.measure.gpu import GpuSnapshot, probe

from .conftest import REPO, shared_settings

MODEL_VARIABLE = "CUDA_TEST_GGUF"
HOG = Path(__file__).with_name("gpu_hog.py")


@dataclass(frozen=True)
class CudaLlama:
    python: Path  # the llama.cpp environment's interpreter
    model: Path
    shared: dict[str, Path]  # what conftest.Daemon takes: envs_dir, data_dir, model
    snapshot: GpuSnapshot


def cuda_llama() -> CudaLlama:
    snapshot = probe()
    if not snapshot.devices:
        pytest.skip(f"needs an NVIDIA GPU with CUDA: NVML sees none ({snapshot.reason})")
    settings = shared_settings()
    env = settings.envs_dir / "llamacpp"
    marker = read_marker(env)
    if marker is None:
        pytest.fail(
            f"no llama.cpp environment at {env}: run `make gpu-check` (or `node-supervisor envs create llamacpp`)"
        )
    build = marker.get("build") or {}
    if not build.get("cuda"):
        pytest.fail(
            f"{env} is a CPU-only build ({build.get('reason', 'no reason recorded')}) on a node with a GPU: "
            "run `node-supervisor envs create llamacpp` here (the node chooses CUDA where nvcc is found)"
        )
    given = os.environ.get(MODEL_VARIABLE)
    model = Path(given) if given else default_model_path(settings)
    if not model.is_file():
        pytest.fail(f"no model at {model}: give a GGUF in {MODEL_VARIABLE} (make gpu-check makes one)")
    shared = {"envs_dir": settings.envs_dir, "data_dir": settings.data_dir, "model": model}
    return CudaLlama(env_python(env), model, shared, snapshot)


def run_report(cuda: CudaLlama, script: str) -> dict[str, Any]:
    """tests/<script> in the llama.cpp environment on the GPU: its JSON report."""
    proc = subprocess.run(
        [str(cuda.python), str(REPO / "tests" / script), str(REPO), str(cuda.model), "cuda"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


class GpuHog:
    """A process holding GPU memory through the CUDA driver (tests/gpu_hog.py) so that ``leave_bytes``
    stay free on the device; with ``leave_bytes`` None, only its CUDA context.  Ends when closed."""

    def __init__(self, device: int, leave_bytes: int | None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HOG), str(device), str(-1 if leave_bytes is None else leave_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.close()
            pytest.fail(f"tests/gpu_hog.py failed: {self.process.stderr.read() if self.process.stderr else ''}")
        self.facts: dict[str, Any] = json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "GpuHog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
