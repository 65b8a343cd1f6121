"""Splitting one model across several GPUs: which devices, and how much on each.  Pure.

Used by the planner (a model that fits whole on no single device) and by the core's
placement (memory as measured, after eviction): the same rule in both, so the plan
and the placement agree on the devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    """Devices in the order the worker sees them (CUDA_VISIBLE_DEVICES; the first, the one with
    the most room, is llama.cpp's main_gpu), and the bytes planned on each."""

    devices: tuple[int, ...]
    shares: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.shares)

    def proportions(self) -> tuple[float, ...]:
        """Each device's part of the whole (llama.cpp's tensor_split)."""
        total = self.total or 1
        return tuple(share / total for share in self.shares)


def split_across(need: int, available: Mapping[int, int], per_device_overhead: int = 0) -> Split | None:
    """The fewest devices, the roomiest first, that hold ``need`` bytes between them, each
    given a share in proportion to its room.  Every device after the first costs
    ``per_device_overhead`` more (a CUDA context of the worker there).  None: fewer than two
    devices with room, or not even all of them together hold it."""
    ranked = sorted((d for d, room in available.items() if room > 0), key=lambda d: (-available[d], d))
    for count in range(2, len(ranked) + 1):
        devices = tuple(ranked[:count])
        total = need + (count - 1) * per_device_overhead
        room = sum(available[d] for d in devices)
        if room < total:
            continue
        shares = [total * available[d] // room for d in devices]
        shares[0] += total - sum(shares)  # rounding: the main device takes the last bytes
        return Split(devices, tuple(shares))
    return None
