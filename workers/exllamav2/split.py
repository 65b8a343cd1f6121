"""ExLlamaV2's ``gpu_split`` for a model the daemon split across GPUs.  Standard library only
(tested without torch or exllamav2).

ExLlamaV2 fills each device in turn with modules up to its ``gpu_split`` allocation (GiB of
weights and scratch, not the cache), and fails if the last one runs out; the cache of each
layer then goes on that layer's device.  So each device but the last is given the weights'
part of its planned share (the weights in proportion to the room the daemon found, the cache
following them by layer) and some scratch; the last is given its whole share, so rounding
never leaves a module without a device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SCRATCH_GIB = 0.5  # per device: ExLlamaV2's hidden-state, mask and attention scratch for one module
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_bytes(model_dir: Path) -> int:
    """The model's weights on disk (0 where they cannot be read: the shares are then taken whole)."""
    try:
        return sum(f.stat().st_size for f in model_dir.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    except OSError:
        return 0


def gpu_split(split_mib: Sequence[int], weights: int) -> list[float]:
    """GiB per visible device for ExLlamaV2's ``model.load(gpu_split=...)``, from the MiB the daemon
    planned on each (LoadSpec.split_mib) and the weights' size in bytes."""
    total_mib = sum(split_mib)
    ratio = min(1.0, weights / (total_mib << 20)) if weights > 0 and total_mib > 0 else 1.0
    head = [round(mib * ratio / 1024 + SCRATCH_GIB, 2) for mib in split_mib[:-1]]
    return [*head, round(split_mib[-1] / 1024, 2)]
