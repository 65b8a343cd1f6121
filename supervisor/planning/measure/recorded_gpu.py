"""A recorded GPU for a daemon under test: NVML's answers read from a JSON file instead of
the driver, so a real daemon with fake engines can be placed, evicted and measured on a
node without a GPU (never a claim that one exists: status says "recorded").

The file (``NODESUP_TEST_GPU`` names it; read again at every probe, so a test may change it):
``{"devices": [{"total_mib": 10000, "neighbours_mib": 0}], "engines": {"a": 4000}}``: each
live worker of an engine listed holds that many MiB on the devices its launch was placed on
(CUDA_VISIBLE_DEVICES), shared evenly where it was split (or a list: MiB on each of them, in
order), as NVML's per-process figures.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .gpu import GpuSnapshot, probe

MIB = 1 << 20
NEIGHBOUR_PID = 999_999

WorkerPids = Callable[[], list[tuple[str, int, tuple[int, ...]]]]  # (engine, pid, devices) of each live worker


class RecordedSource:
    """The NvmlSource calls, answered from the file and the daemon's live workers."""

    def __init__(self, path: Path, workers: WorkerPids) -> None:
        self.path, self.workers = path, workers
        self.spec: dict[str, Any] = {}

    def init(self) -> None:
        self.spec = json.loads(self.path.read_text())

    def shutdown(self) -> None:
        pass

    def driver_version(self) -> str:
        return "recorded"

    def cuda_version(self) -> int:
        return 12080

    def device_count(self) -> int:
        return len(self.spec.get("devices", []))

    def handle(self, index: int) -> Any:
        return index

    def name(self, handle: Any) -> str:
        return f"recorded GPU {handle}"

    def uuid(self, handle: Any) -> str:
        return f"GPU-recorded-{handle}"

    def _held(self, index: int) -> list[tuple[int, int]]:
        engines = self.spec.get("engines", {})
        held = [
            (pid, _share(engines[name], devices, index) * MIB)
            for name, pid, devices in self.workers()
            if index in devices and name in engines
        ]
        neighbours = self.spec["devices"][index].get("neighbours_mib", 0)
        return held + ([(NEIGHBOUR_PID, neighbours * MIB)] if neighbours else [])

    def memory(self, handle: Any) -> tuple[int, int, int]:
        total = self.spec["devices"][handle]["total_mib"] * MIB
        used = sum(b for _, b in self._held(handle))
        return total, max(0, total - used), used

    def processes(self, handle: Any) -> list[tuple[int, int | None]]:
        return [(pid, used) for pid, used in self._held(handle)]


def _share(mib: int | list[int], devices: tuple[int, ...], index: int) -> int:
    """An engine's MiB on one of its devices: the list's entry for it, or the total shared evenly."""
    if isinstance(mib, list):
        position = devices.index(index)
        return mib[position] if position < len(mib) else 0
    return mib // len(devices)


def recorded_probe(path: Path, workers: WorkerPids) -> Callable[[], GpuSnapshot]:
    return lambda: probe(RecordedSource(path, workers))
