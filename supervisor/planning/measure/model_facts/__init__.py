"""What a model file says about its own shape and sizes, read without loading it.

The memory estimate (``supervisor.core.estimate``) needs a model's layer
count, attention shape, vocabulary and the bytes of each block's weights
before any engine starts: deciding whether a model fits the GPU is the point
of reading it.  A GGUF file carries all of that in its header, an EXL2
directory in ``config.json`` and the safetensors headers.  Neither reader
touches tensor data, so a multi-GB model costs a few page reads.
"""

from __future__ import annotations

from pathlib import Path

from ._common import ModelFacts, ModelFactsError
from ._exl2 import read_exl2
from ._gguf import read_gguf, swa_layer_count

__all__ = ["ModelFacts", "ModelFactsError", "read_model_facts", "swa_layer_count"]


def read_model_facts(path: Path) -> ModelFacts:
    """Facts of a .gguf file or an EXL2 model directory."""
    path = Path(path)
    if path.is_dir():
        return read_exl2(path)
    if not path.is_file():
        raise ModelFactsError(f"{path}: no such file or directory")
    return read_gguf(path)
