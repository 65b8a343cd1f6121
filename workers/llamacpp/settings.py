"""llama.cpp's threads, batch sizes and flash attention for one load: the
configured value where there is one, else a default chosen for the device.

A helper of workers/llamacpp/engine.py; standard library only (it runs in the
engine's environment, which has no psutil, and is tested without llama_cpp).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..protocol.messages import LoadSpec

# enum llama_flash_attn_type (llama.h)
FLASH_ATTN_AUTO, FLASH_ATTN_DISABLED, FLASH_ATTN_ENABLED = -1, 0, 1

# Batch sizes by where the layers run.  On a GPU, llama.cpp's own tools'
# defaults (llama-server, llama-bench): a long prompt goes to llama_decode in
# 2048-token calls, split into 512-token micro-batches.  On the CPU a logical
# batch larger than the micro-batch gains nothing: llama-cpp-python's 512.
# The micro-batch, which sizes the compute buffers the planner estimates, is
# 512 on both.
GPU_BATCH, CPU_BATCH, MICRO_BATCH = 2048, 512, 512

SYS_CPU = Path("/sys/devices/system/cpu")
PROC_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class LoadSettings:
    n_threads: int
    n_threads_batch: int
    n_batch: int
    n_ubatch: int
    flash_attn: int  # a FLASH_ATTN_* value: AUTO lets llama.cpp turn it on where the device supports it

    def llama_kwargs(self) -> dict[str, Any]:
        """Llama() keyword arguments (flash attention goes to the context parameters instead: see native.py)."""
        return {
            "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads_batch,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
        }


def choose(spec: LoadSpec, options: dict[str, Any], layers_on_gpu: bool, quantized_cache: bool) -> LoadSettings:
    """The settings for one load: the spec's explicit value, else the engine's
    ``options`` (extra Llama() arguments), else the default for the device.

    ``layers_on_gpu``: layers are offloaded and the build can offload.  Flash
    attention then defaults to llama.cpp's "auto" (on where the device
    supports it); on the CPU it is off unless set.  A quantized V cache needs
    it, so it is on for those whatever was asked.
    """

    def pick(key: str, default: Any) -> Any:
        value = getattr(spec, key)
        if value is None:
            value = options.get(key)
        return default if value is None else value

    threads = int(pick("n_threads", 0)) or physical_cores()
    flash = pick("flash_attn", None)
    if quantized_cache:
        flash_type = FLASH_ATTN_ENABLED
    elif flash is None:
        flash_type = FLASH_ATTN_AUTO if layers_on_gpu else FLASH_ATTN_DISABLED
    else:
        flash_type = FLASH_ATTN_ENABLED if flash else FLASH_ATTN_DISABLED
    return LoadSettings(
        n_threads=threads,
        n_threads_batch=int(pick("n_threads_batch", 0)) or threads,
        n_batch=int(pick("n_batch", GPU_BATCH if layers_on_gpu else CPU_BATCH)),
        n_ubatch=int(pick("n_ubatch", MICRO_BATCH)),
        flash_attn=flash_type,
    )


def split_kwargs(spec: LoadSpec) -> dict[str, Any]:
    """Llama() arguments for a model split across the GPUs the worker sees (the daemon lists only
    them in CUDA_VISIBLE_DEVICES, so their indexes here are 0, 1, ...): ``tensor_split``, each
    device's part in proportion to the MiB planned on it, and ``main_gpu`` 0, the roomiest (it
    holds the scratch buffers and the small tensors).  Nothing for one device."""
    if len(spec.split_mib) < 2:
        return {}
    total = sum(spec.split_mib)
    if total <= 0:
        return {}
    return {"tensor_split": [mib / total for mib in spec.split_mib], "main_gpu": 0}


def physical_cores(allowed: Iterable[int] | None = None, sys_cpu: Path = SYS_CPU, cpuinfo: Path = PROC_CPUINFO) -> int:
    """Physical cores among the CPUs this process may run on (``allowed``;
    default: its affinity), as llama.cpp's own tools count threads: one per
    core, hyper-threads left out (those tools also leave out the efficiency
    cores of Intel's hybrid CPUs; these are counted).  From Linux's CPU
    topology, else /proc/cpuinfo's (physical id, core id) pairs, else all
    logical CPUs."""
    if allowed is None:
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ()
    cores = set()
    for cpu in sorted(allowed):
        try:
            cores.add((sys_cpu / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            cores.clear()
            break
    return len(cores) or _cores_in_cpuinfo(cpuinfo) or os.cpu_count() or 1


def _cores_in_cpuinfo(cpuinfo: Path) -> int:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return 0
    cores = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores)
