"""What the node's NVIDIA GPUs hold right now, read through NVML (nvidia-ml-py).

The GPU is shared with other services, so what matters is not only how much
memory a card has but how much is free and who holds the rest: per-process
figures let ``status`` show which share is ours and which the neighbours'.

``probe()`` never raises.  A node without a driver is a normal case (CI, a
CPU-only box), reported as ``devices=()`` with one line saying why; a device
NVML cannot read is left out with its reason in ``skipped``.  All NVML calls
go through an ``NvmlSource``, so tests replay recorded figures instead of
needing a GPU.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol

# NVML return codes (nvml.h) that get their own wording; pynvml raises NVMLError subclasses carrying them.
_LIBRARY_NOT_FOUND = 12
_DRIVER_NOT_LOADED = 9
_NO_PERMISSION = 4
_FUNCTION_NOT_FOUND = 13
# Backends of a llama.cpp build that can drive an NVIDIA GPU (gpu_backends_built in `envs check`).
NVIDIA_BACKENDS = frozenset({"cuda", "vulkan"})
NO_DRIVER = "no NVIDIA driver (libnvidia-ml not found)"
NO_DEVICE = "NVML: no device"


@dataclass(frozen=True)
class GpuProcess:
    pid: int  # as the driver sees it: the host's pid namespace, not a container's
    used_bytes: int | None  # None where the driver cannot tell (e.g. Windows WDDM)


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    processes: tuple[GpuProcess, ...]


@dataclass(frozen=True)
class GpuSnapshot:
    devices: tuple[GpuDevice, ...]
    driver_version: str | None
    cuda_version: str | None  # the newest CUDA the driver supports, "13.0"
    reason: str  # why there are no devices; "" when there are
    skipped: tuple[str, ...] = ()  # devices NVML counted but could not read: "GPU 1: NVML: GPU is lost"


class NvmlSource(Protocol):
    """The NVML calls the probe makes; a failing call raises (pynvml.NVMLError or anything else)."""

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def driver_version(self) -> str: ...
    def cuda_version(self) -> int: ...  # NVML's integer, 13000 for 13.0
    def device_count(self) -> int: ...
    def handle(self, index: int) -> Any: ...
    def name(self, handle: Any) -> str: ...
    def uuid(self, handle: Any) -> str: ...
    def memory(self, handle: Any) -> tuple[int, int, int]: ...  # total, free, used
    def processes(self, handle: Any) -> list[tuple[int, int | None]]: ...  # (pid, used bytes)


class PynvmlSource:
    """The real NVML through nvidia-ml-py, imported only when probing."""

    def __init__(self) -> None:
        import pynvml  # nvidia-ml-py; importing it loads no library yet

        self.nvml = pynvml

    def init(self) -> None:
        self.nvml.nvmlInit()

    def shutdown(self) -> None:
        self.nvml.nvmlShutdown()

    def driver_version(self) -> str:
        return _text(self.nvml.nvmlSystemGetDriverVersion())

    def cuda_version(self) -> int:
        return int(self.nvml.nvmlSystemGetCudaDriverVersion())

    def device_count(self) -> int:
        return int(self.nvml.nvmlDeviceGetCount())

    def handle(self, index: int) -> Any:
        return self.nvml.nvmlDeviceGetHandleByIndex(index)

    def name(self, handle: Any) -> str:
        return _text(self.nvml.nvmlDeviceGetName(handle))

    def uuid(self, handle: Any) -> str:
        return _text(self.nvml.nvmlDeviceGetUUID(handle))

    def memory(self, handle: Any) -> tuple[int, int, int]:
        """v2 where the driver has it: it counts the driver's reserve apart, so ``used`` is what
        processes allocated, as nvidia-smi shows it.  Measured on an H100 (driver 580): v1 used =
        v2 used + 480 MiB reserved; free is the same in both."""
        nvml = self.nvml
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        except (nvml.NVMLError, AttributeError):  # older driver or binding
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), int(info.free), int(info.used)

    def processes(self, handle: Any) -> list[tuple[int, int | None]]:
        nvml = self.nvml
        try:
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)  # _v3: drivers from 510 on
        except nvml.NVMLError as exc:
            if getattr(exc, "value", None) != _FUNCTION_NOT_FOUND:
                raise
            procs = nvml.nvmlDeviceGetComputeRunningProcesses_v2(handle)
        return [(int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory)) for p in procs]


def probe(source: NvmlSource | None = None) -> GpuSnapshot:
    """The node's NVIDIA GPUs now; without a driver, ``devices=()`` and the reason. Never raises."""
    try:
        source = source if source is not None else PynvmlSource()
        source.init()
    except ImportError:
        return _none("nvidia-ml-py is not installed (module pynvml)")
    except Exception as exc:
        return _none(describe_error(exc))
    try:
        return _read(source)
    except Exception as exc:  # anything NVML or a binding bug throws: the caller gets a reason, not a traceback
        return _none(describe_error(exc))
    finally:
        with suppress(Exception):
            source.shutdown()


def _read(source: NvmlSource) -> GpuSnapshot:
    driver = _optional(source.driver_version)
    cuda = _optional(source.cuda_version)
    count = source.device_count()
    devices, skipped = [], []
    for index in range(count):
        try:
            devices.append(_device(source, index))
        except Exception as exc:
            skipped.append(f"GPU {index}: {describe_error(exc)}")
    reason = "" if devices else ("; ".join(skipped) or NO_DEVICE)
    return GpuSnapshot(tuple(devices), driver, _cuda_text(cuda), reason, tuple(skipped))


def _device(source: NvmlSource, index: int) -> GpuDevice:
    """One device; without memory figures it is useless and raises, other gaps are filled in."""
    handle = source.handle(index)
    total, free, used = source.memory(handle)
    processes = _optional(lambda: source.processes(handle)) or []
    return GpuDevice(
        index=index,
        name=_optional(lambda: source.name(handle)) or "",
        uuid=_optional(lambda: source.uuid(handle)) or "",
        total_bytes=total,
        free_bytes=free,
        used_bytes=used,
        processes=tuple(GpuProcess(pid, used_bytes) for pid, used_bytes in processes),
    )


def describe_error(exc: BaseException) -> str:
    """One line for an operator: the missing driver said plainly, other NVML errors by name."""
    code = getattr(exc, "value", None)
    if code == _LIBRARY_NOT_FOUND:
        return NO_DRIVER
    if code == _DRIVER_NOT_LOADED:
        return "NVIDIA driver not loaded (libnvidia-ml found, kernel module absent)"
    if code == _NO_PERMISSION:
        return "NVML: insufficient permissions"
    return f"NVML: {exc}" if type(exc).__name__.startswith("NVMLError") else f"NVML: {type(exc).__name__}: {exc}"


def _optional(call: Any) -> Any:
    """A figure that may be missing (old driver, not supported) without losing the rest."""
    try:
        return call()
    except Exception:
        return None


def _none(reason: str) -> GpuSnapshot:
    return GpuSnapshot(devices=(), driver_version=None, cuda_version=None, reason=reason)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _cuda_text(version: int | None) -> str | None:
    return None if version is None else f"{version // 1000}.{version % 1000 // 10}"


def snapshot_to_dict(s: GpuSnapshot) -> dict[str, Any]:
    """Plain JSON types, for status and for recording a node's figures."""
    return {
        "devices": [
            {
                **{k: getattr(d, k) for k in ("index", "name", "uuid", "total_bytes", "free_bytes", "used_bytes")},
                "processes": [{"pid": p.pid, "used_bytes": p.used_bytes} for p in d.processes],
            }
            for d in s.devices
        ],
        "driver_version": s.driver_version,
        "cuda_version": s.cuda_version,
        "reason": s.reason,
        "skipped": list(s.skipped),
    }


def snapshot_from_dict(d: dict[str, Any]) -> GpuSnapshot:
    """The inverse of snapshot_to_dict; ``skipped`` and ``processes`` may be absent."""
    devices = tuple(
        GpuDevice(
            index=int(dev["index"]),
            name=str(dev["name"]),
            uuid=str(dev["uuid"]),
            total_bytes=int(dev["total_bytes"]),
            free_bytes=int(dev["free_bytes"]),
            used_bytes=int(dev["used_bytes"]),
            processes=tuple(GpuProcess(int(p["pid"]), p.get("used_bytes")) for p in dev.get("processes", [])),
        )
        for dev in d.get("devices", [])
    )
    return GpuSnapshot(
        devices, d.get("driver_version"), d.get("cuda_version"), str(d.get("reason", "")), tuple(d.get("skipped", ()))
    )


def cpu_only_build_on_gpu_node(facts: dict[str, Any], snapshot: GpuSnapshot) -> str | None:
    """The warning for llama.cpp built without a GPU backend on a node with NVIDIA GPUs, else None.

    ``facts``: what ``envs check`` reports (``check_env``), or a worker's engine facts
    (``gpu_offload``, ``gpu_backends_built``).  Such a build ignores n_gpu_layers without a word.
    """
    engine = facts.get("engine", facts)
    if not snapshot.devices or not isinstance(engine, dict) or "gpu_backends_built" not in engine:
        return None
    if engine.get("gpu_offload") or NVIDIA_BACKENDS & set(engine.get("gpu_backends_built") or ()):
        return None
    env = facts.get("env") or "llamacpp"
    gpus = ", ".join(sorted({d.name or "NVIDIA GPU" for d in snapshot.devices}))
    return (
        f"llama.cpp in environment {env!r} is a CPU-only build on a node with {len(snapshot.devices)} NVIDIA GPU(s) ({gpus}): "
        f'n_gpu_layers is ignored. Rebuild it with CUDA (needs nvcc): CMAKE_ARGS="-DGGML_CUDA=on" node-supervisor envs create {env}'
        f' (or set llama_cuda = "on" in the config and run: node-supervisor envs create {env})'
    )
