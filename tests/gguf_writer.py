"""A minimal GGUF (version 3) writer for tests: metadata and tensor table as the
format defines them, tensor data left as a hole (zeros, or a sparse file).

The daemon's environment, where the tests run, deliberately has no `gguf`
package (it brings NumPy, which the daemon keeps out: tests/test_isolation.py).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from supervisor.planning.measure.model_facts._ggml_types import QUANT_SIZES, TYPE_NAMES, ValueType

ALIGNMENT = 32  # general.alignment's default
Q = SimpleNamespace(**{name: name for name in TYPE_NAMES})  # Q.Q8_0 == "Q8_0": ggml type names


def pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def tensor_bytes(dims: tuple[int, ...], qtype: str) -> int:
    block, size = QUANT_SIZES[TYPE_NAMES[qtype]]
    return math.prod(dims) // block * size


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _scalar(value: Any) -> tuple[int, bytes]:
    if isinstance(value, bool):
        return ValueType.BOOL, struct.pack("<?", value)
    if isinstance(value, int):
        return (
            (ValueType.UINT32, struct.pack("<I", value))
            if 0 <= value < 1 << 32
            else (ValueType.INT64, struct.pack("<q", value))
        )
    if isinstance(value, float):
        return ValueType.FLOAT32, struct.pack("<f", value)
    if isinstance(value, str):
        return ValueType.STRING, _string(value)
    raise TypeError(f"no GGUF value type for {value!r}")


def _value(value: Any) -> tuple[int, bytes]:
    if not isinstance(value, (list, tuple)):
        return _scalar(value)
    items = [_scalar(item) for item in value]
    item_type = items[0][0] if items else ValueType.UINT32
    return ValueType.ARRAY, struct.pack("<IQ", item_type, len(items)) + b"".join(payload for _, payload in items)


def write_gguf(path: Path, arch: str, kv: dict[str, Any], tensors: list[tuple[str, tuple[int, ...], str]]) -> int:
    """Write ``tensors`` ((name, dims in ggml's order, ggml type name)) with ``kv``; data is a hole.
    Returns the total (aligned) tensor bytes."""
    kv = {"general.architecture": arch, **kv}
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for key, value in kv.items():
        value_type, payload = _value(value)
        out += _string(key) + struct.pack("<I", value_type) + payload
    offset = 0
    for name, dims, qtype in tensors:
        out += _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", TYPE_NAMES[qtype], offset)
        offset += pad(tensor_bytes(dims, qtype))
    with open(path, "wb") as handle:
        handle.write(out + bytes(pad(len(out)) - len(out)))
        handle.truncate(pad(len(out)) + offset)
    return offset
