"""The GPU probe: recorded NVML figures in, a snapshot out; never an exception, on any node."""

from __future__ import annotations

import ctypes.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pynvml
import pytest

from supervisor.planning.measure import gpu as gpu_probe
from supervisor.planning.measure.gpu import (
    GpuDevice,
    GpuProcess,
    GpuSnapshot,
    cpu_only_build_on_gpu_node,
    probe,
    snapshot_from_dict,
    snapshot_to_dict,
)

from .conftest import REPO

GiB = 1 << 30
# A 12 GB consumer card shared with a neighbour: our worker (pid 4242) and someone else's (pid 777).
CARD_12GB = {
    "name": "NVIDIA GeForce RTX 3060",
    "uuid": "GPU-0a1b2c3d-0000-1111-2222-333344445555",
    "memory": (12 * GiB, 7 * GiB, 5 * GiB),
    "processes": [(4242, 3 * GiB), (777, 3 * GiB // 2)],
}
CARD_24GB = {
    "name": "NVIDIA GeForce RTX 4090",
    "uuid": "GPU-ffff",
    "memory": (24 * GiB, 23 * GiB, GiB),
    "processes": [],
}


class RecordedNvml:
    """An NvmlSource replaying recorded figures; ``errors`` maps (call, device index) to what it raises."""

    def __init__(self, cards: list[dict[str, Any]], errors: dict[tuple[str, int | None], Exception] | None = None):
        self.cards, self.errors, self.calls = cards, errors or {}, []

    def _call(self, name: str, index: int | None = None) -> None:
        self.calls.append((name, index))
        if (name, index) in self.errors:
            raise self.errors[(name, index)]

    def init(self) -> None:
        self._call("init")

    def shutdown(self) -> None:
        self._call("shutdown")

    def driver_version(self) -> str:
        self._call("driver_version")
        return "580.95.05"

    def cuda_version(self) -> int:
        self._call("cuda_version")
        return 13000

    def device_count(self) -> int:
        self._call("device_count")
        return len(self.cards)

    def handle(self, index: int) -> int:
        self._call("handle", index)
        return index

    def name(self, handle: int) -> str:
        self._call("name", handle)
        return self.cards[handle]["name"]

    def uuid(self, handle: int) -> str:
        self._call("uuid", handle)
        return self.cards[handle]["uuid"]

    def memory(self, handle: int) -> tuple[int, int, int]:
        self._call("memory", handle)
        return self.cards[handle]["memory"]

    def processes(self, handle: int) -> list[tuple[int, int | None]]:
        self._call("processes", handle)
        return self.cards[handle]["processes"]


def test_a_12gb_card_with_our_worker_and_a_neighbour():
    s = probe(RecordedNvml([CARD_12GB]))
    assert s.reason == "" and s.skipped == ()
    assert s.driver_version == "580.95.05" and s.cuda_version == "13.0"
    (card,) = s.devices
    assert card == GpuDevice(
        index=0,
        name="NVIDIA GeForce RTX 3060",
        uuid="GPU-0a1b2c3d-0000-1111-2222-333344445555",
        total_bytes=12 * GiB,
        free_bytes=7 * GiB,
        used_bytes=5 * GiB,
        processes=(GpuProcess(4242, 3 * GiB), GpuProcess(777, 3 * GiB // 2)),
    )
    ours = sum(p.used_bytes or 0 for p in card.processes if p.pid == 4242)
    assert ours == 3 * GiB and card.used_bytes - ours == 2 * GiB  # the neighbours' share (and contexts) is visible


def test_two_gpus_in_index_order_and_nvml_shut_down():
    source = RecordedNvml([CARD_12GB, CARD_24GB])
    s = probe(source)
    assert [(d.index, d.name, d.total_bytes) for d in s.devices] == [
        (0, CARD_12GB["name"], 12 * GiB),
        (1, CARD_24GB["name"], 24 * GiB),
    ]
    assert s.devices[1].processes == ()
    assert source.calls[0] == ("init", None) and source.calls[-1] == ("shutdown", None)


def test_a_device_nvml_cannot_read_is_skipped_with_its_reason_the_other_reported():
    lost = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    s = probe(RecordedNvml([CARD_12GB, CARD_24GB], {("memory", 1): lost}))
    assert [d.index for d in s.devices] == [0]
    assert s.skipped == ("GPU 1: NVML: GPU is lost",) and s.reason == ""


def test_missing_names_or_process_lists_keep_the_device():
    unsupported = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    s = probe(
        RecordedNvml(
            [CARD_12GB], {("processes", 0): unsupported, ("name", 0): unsupported, ("cuda_version", None): unsupported}
        )
    )
    (card,) = s.devices
    assert card.processes == () and card.name == "" and card.total_bytes == 12 * GiB
    assert s.cuda_version is None and s.driver_version == "580.95.05"


def test_when_no_device_can_be_read_the_reason_says_why():
    s = probe(RecordedNvml([CARD_12GB], {("handle", 0): pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)}))
    assert s.devices == () and s.reason == "GPU 0: NVML: insufficient permissions"
    assert probe(RecordedNvml([])).reason == "NVML: no device"


@pytest.mark.parametrize(
    "error, reason",
    [
        (pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), "no NVIDIA driver (libnvidia-ml not found)"),
        (
            pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED),
            "NVIDIA driver not loaded (libnvidia-ml found, kernel module absent)",
        ),
        (RuntimeError("binding bug"), "NVML: RuntimeError: binding bug"),
    ],
)
def test_init_failures_give_one_line_and_no_exception(error, reason):
    s = probe(RecordedNvml([CARD_12GB], {("init", None): error}))
    assert s == GpuSnapshot(devices=(), driver_version=None, cuda_version=None, reason=reason)


def test_an_error_mid_probe_still_shuts_nvml_down():
    source = RecordedNvml([CARD_12GB], {("device_count", None): pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)})
    s = probe(source)
    assert s.devices == () and s.reason == "NVML: Unknown Error"
    assert source.calls[-1] == ("shutdown", None)


def test_the_real_probe_on_this_machine_never_raises():
    s = probe()
    assert isinstance(s, GpuSnapshot)
    assert bool(s.devices) != bool(s.reason)  # devices, or the reason there are none
    if ctypes.util.find_library("nvidia-ml") is None and not Path("/proc/driver/nvidia/version").exists():
        assert s.devices == () and s.reason == gpu_probe.NO_DRIVER


def test_without_a_driver_a_fresh_interpreter_prints_the_reason_and_no_traceback():
    code = "from supervisor.planning.measure.gpu import probe; s = probe(); print(len(s.devices), s.reason or 'ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    count, reason = result.stdout.strip().split(" ", 1)
    assert (count == "0") == (reason != "ok")


def test_snapshots_survive_json_both_ways():
    s = probe(RecordedNvml([CARD_12GB, CARD_24GB], {("memory", 1): pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)}))
    d = json.loads(json.dumps(snapshot_to_dict(s)))
    assert d["devices"][0]["processes"][0] == {"pid": 4242, "used_bytes": 3 * GiB}
    assert snapshot_from_dict(d) == s
    assert (
        snapshot_from_dict({"devices": [], "driver_version": None, "cuda_version": None, "reason": "x"}).skipped == ()
    )


@pytest.mark.cuda
def test_a_real_gpu_reports_positive_memory():
    s = probe()
    if not s.devices:
        pytest.skip(f"needs an NVIDIA driver: {s.reason}")
    for device in s.devices:
        assert device.total_bytes > 0 and 0 < device.free_bytes <= device.total_bytes, device
        assert device.uuid.startswith(("GPU-", "MIG-")) and device.name
    assert s.driver_version and re.fullmatch(r"\d+\.\d", s.cuda_version or ""), s


# --- the CPU-only llama.cpp build on a GPU node -------------------------------------------------------

# What `envs check` reported for a CPU-only build (recorded on this machine).
CPU_BUILD_FACTS = {
    "env": "llamacpp",
    "current": True,
    "packages": {"llama-cpp-python": "0.3.36", "numpy": "2.3.5"},
    "engine": {
        "llama_cpp_python": "0.3.36",
        "gpu_offload": False,
        "gpu_backends_built": [],
        "system_info": "CPU : SSE3 = 1 | AVX2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |",
        "numpy": "2.3.5",
    },
}
GPU_NODE = snapshot_from_dict(
    {
        "devices": [
            {
                "index": 0,
                "name": "NVIDIA GeForce RTX 3060",
                "uuid": "GPU-0a1b",
                "total_bytes": 12 * GiB,
                "free_bytes": 7 * GiB,
                "used_bytes": 5 * GiB,
                "processes": [{"pid": 777, "used_bytes": 2 * GiB}],
            }
        ],
        "driver_version": "580.95.05",
        "cuda_version": "13.0",
        "reason": "",
    }
)
NO_GPU = GpuSnapshot((), None, None, gpu_probe.NO_DRIVER)


def test_a_cpu_only_build_on_a_gpu_node_is_called_out_with_the_command_that_fixes_it():
    warning = cpu_only_build_on_gpu_node(CPU_BUILD_FACTS, GPU_NODE)
    assert warning is not None and "CPU-only build" in warning and "RTX 3060" in warning
    assert 'CMAKE_ARGS="-DGGML_CUDA=on" node-supervisor envs create llamacpp' in warning
    assert 'llama_cuda = "on"' in warning
    # A worker's own engine facts (its hello) will do as well; the env name defaults to the kind.
    assert cpu_only_build_on_gpu_node(CPU_BUILD_FACTS["engine"], GPU_NODE) == warning
    assert "envs create llama-big" in (
        cpu_only_build_on_gpu_node({**CPU_BUILD_FACTS, "env": "llama-big"}, GPU_NODE) or ""
    )


def test_no_warning_for_a_gpu_build_a_node_without_gpu_or_another_engine():
    cuda_build = {
        **CPU_BUILD_FACTS,
        "engine": {**CPU_BUILD_FACTS["engine"], "gpu_backends_built": ["cuda"], "gpu_offload": True},
    }
    assert cpu_only_build_on_gpu_node(cuda_build, GPU_NODE) is None
    assert cpu_only_build_on_gpu_node(CPU_BUILD_FACTS, NO_GPU) is None
    exllamav2 = {
        "env": "exllamav2",
        "packages": {"torch": "2.13.0"},
        "cuda_available": True,
        "engine": {"exllamav2": "0.3.2"},
    }
    assert cpu_only_build_on_gpu_node(exllamav2, GPU_NODE) is None
    unavailable = {"env": "llamacpp", "unavailable": "EngineUnavailable: llama_cpp failed to import"}
    assert cpu_only_build_on_gpu_node(unavailable, GPU_NODE) is None
