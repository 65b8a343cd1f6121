"""The GGUF header: metadata and tensor table, walked in a memory map.

Parsed here rather than with ``gguf.GGUFReader``: that reader turns every
metadata array element into a NumPy view, which for Gemma 3's 262 144-token
vocabulary took about 11 s on the default model (the budget is 0.5 s).  This
walk steps over the arrays it does not need (strings by their length fields,
numeric arrays in one step) and never reads tensor data.  The ``gguf``
package still supplies the format's constants: value types, quantization
block sizes, file type names.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _ggml_types as ggml
from ._common import ModelFacts, ModelFactsError

_V = ggml.ValueType
_SCALAR_FORMATS = {
    _V.UINT8: "B",
    _V.INT8: "b",
    _V.UINT16: "H",
    _V.INT16: "h",
    _V.UINT32: "I",
    _V.INT32: "i",
    _V.FLOAT32: "f",
    _V.BOOL: "?",
    _V.UINT64: "Q",
    _V.INT64: "q",
    _V.FLOAT64: "d",
}
_KEEP_ARRAY_MAX = 4096  # per-layer arrays are kept; vocabularies and scores are only counted

# Sliding-window layouts llama.cpp assumes when a GGUF carries no
# <arch>.attention.sliding_window_pattern: (period, dense_first) as given to
# llama_hparams::set_swa_pattern in src/models/<arch>.cpp (llama.cpp as
# vendored by llama-cpp-python 0.3.36).  Without dense_first, the last layer
# of each period is global (Gemma 3: 5 local, then 1 global); with it, the first.
_SWA_PATTERNS = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "cohere2moe": (4, True),
    "olmo2": (4, False),
    "gpt-oss": (2, False),
    "afmoe": (4, False),
    "mellum": (4, False),
    "plamo3": (8, False),
    "laguna": (4, True),
    "smallthinker": (4, True),
}

_BLOCK_RE = re.compile(r"blk\.(\d+)\.")

# Types ggml's CPU backend repacks for AVX2 matrix products when the row count
# is a multiple of 8 (ggml_repack_get_optimal_repack_type in ggml-cpu/repack.cpp):
# such a block weighs twice in RAM, the mapped file plus the CPU_REPACK copy.
_REPACKED = {ggml.TYPE_NAMES[name] for name in ("Q4_0", "Q4_K", "IQ4_NL", "MXFP4")}


@dataclass(frozen=True)
class _Skipped:
    """An array the header walk stepped over: only its length is kept."""

    count: int


class _Header:
    """A sequential reader over a GGUF header in a memory map, in the file's byte order."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.path, self.off = buf, path, 0
        self.endian = "<"
        if bytes(buf[:4]) != b"GGUF":
            raise ModelFactsError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        self.off = 4
        version = self.scalar("I")
        if version & 0xFFFF == 0:  # a big-endian file read little-endian
            self.endian, self.off = ">", 4
            version = self.scalar("I")
        if version not in (2, 3):
            raise ModelFactsError(f"{path}: unsupported GGUF version {version}")

    def scalar(self, fmt: str) -> Any:
        st = struct.Struct(self.endian + fmt)
        try:
            (value,) = st.unpack_from(self.buf, self.off)
        except struct.error:
            raise ModelFactsError(f"{self.path}: GGUF header is truncated") from None
        self.off += st.size
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.off + n > len(self.buf):
            raise ModelFactsError(f"{self.path}: GGUF header is truncated")
        raw = bytes(self.buf[self.off : self.off + n])
        self.off += n
        return raw.decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype == _V.STRING:
            return self.string()
        if vtype == _V.ARRAY:
            return self.array()
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise ModelFactsError(f"{self.path}: unknown GGUF value type {vtype}")
        return self.scalar(fmt)

    def array(self) -> Any:
        """A small numeric array as a tuple; anything else is stepped over, keeping its length."""
        etype, count = self.scalar("I"), self.scalar("Q")
        fmt = _SCALAR_FORMATS.get(etype)
        if fmt is not None and count <= _KEEP_ARRAY_MAX:
            return tuple(self.scalar(fmt) for _ in range(count))
        if fmt is not None:
            self.off += count * struct.calcsize(fmt)
        elif etype == _V.STRING:
            self._skip_strings(count)
        else:  # arrays of arrays: rare, small
            for _ in range(count):
                self.value(etype)
        return _Skipped(count)

    def _skip_strings(self, count: int) -> None:
        """Step over `count` strings (a vocabulary): only their length fields are read."""
        unpack, buf, off = struct.Struct(self.endian + "Q").unpack_from, self.buf, self.off
        try:
            for _ in range(count):
                off += 8 + unpack(buf, off)[0]
        except struct.error:
            raise ModelFactsError(f"{self.path}: GGUF header is truncated") from None
        self.off = off


def read_gguf(path: Path) -> ModelFacts:
    """Parse the header (metadata and tensor table) of a memory-mapped GGUF file."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ModelFactsError(f"{path}: empty file, not a GGUF model") from None
    with buf:
        header = _Header(buf, path)
        n_tensors, n_kv = header.scalar("Q"), header.scalar("Q")
        kv = {}
        for _ in range(n_kv):
            key = header.string()
            kv[key] = header.value(header.scalar("I"))
        tensors = _tensor_table(header, n_tensors)
        align = int(kv.get("general.alignment", 32))
        data_start = -(-header.off // align) * align
        file_bytes = len(buf)
    end = data_start + max((t.offset + t.size for t in tensors.values()), default=0)
    if end > file_bytes:
        raise ModelFactsError(f"{path}: truncated: tensor data ends at byte {end}, the file has {file_bytes}")
    try:
        return _gguf_facts(path, kv, tensors, file_bytes)
    except ValueError as exc:
        raise ModelFactsError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class _Tensor:
    offset: int  # in the data section
    size: int  # bytes
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    ggml_type: int

    @property
    def repacked(self) -> bool:
        return self.ggml_type in _REPACKED and len(self.dims) >= 2 and self.dims[1] % 8 == 0


def _tensor_table(header: _Header, n_tensors: int) -> dict[str, _Tensor]:
    """The tensor infos, with each tensor's size computed from its type's block size."""
    tensors = {}
    for _ in range(n_tensors):
        name = header.string()
        dims = tuple(header.scalar("Q") for _ in range(header.scalar("I")))
        ttype, offset = header.scalar("I"), header.scalar("Q")
        try:
            block, type_size = ggml.QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise ModelFactsError(f"{header.path}: tensor {name} has unknown ggml type {ttype}") from None
        elements = 1
        for d in dims:
            elements *= d
        tensors[name] = _Tensor(offset, elements // block * type_size, dims, ttype)
    return tensors


def _gguf_facts(path: Path, kv: dict[str, Any], tensors: dict[str, _Tensor], file_bytes: int) -> ModelFacts:
    """ModelFacts from the metadata and tensor sizes, with llama.cpp's defaults for missing keys."""
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError("no general.architecture in the GGUF metadata")

    def key(name: str, default: Any = None) -> int:
        value = kv.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"no {arch}.{name} in the GGUF metadata")
        return _widest(value, f"{arch}.{name}")

    n_layer, n_embd, n_head = key("block_count"), key("embedding_length"), key("attention.head_count")
    if n_head <= 0 or n_layer <= 0:
        raise ValueError(f"{arch}.block_count {n_layer} / attention.head_count {n_head} must be positive")
    window, swa_layers = _sliding_window(kv, arch, n_layer)
    layers, rest = _split_sizes({name: t.size for name, t in tensors.items()}, n_layer)
    repack, _ = _split_sizes({name: t.size for name, t in tensors.items() if t.repacked}, n_layer)
    embd, output = tensors.get("token_embd.weight"), tensors.get("output.weight")
    embd_bytes, output_bytes = embd.size if embd else 0, output.size if output else 0
    return ModelFacts(
        path=str(path),
        format="gguf",
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=key("attention.head_count_kv", n_head),
        head_dim_k=key("attention.key_length", n_embd // n_head),
        head_dim_v=key("attention.value_length", n_embd // n_head),
        n_ctx_train=key("context_length", 0),
        n_vocab=_vocab_size(kv, arch, embd),
        sliding_window=window,
        swa_layers=swa_layers,
        file_type=_file_type(kv.get("general.file_type")),
        file_bytes=file_bytes,
        layer_bytes=layers,
        token_embd_bytes=embd_bytes,
        output_bytes=output_bytes,
        other_bytes=rest - embd_bytes - output_bytes,
        layer_repack_bytes=repack if any(repack) else (),
        parameters=sum(math.prod(t.dims) for t in tensors.values()),
    )


def _widest(value: Any, name: str) -> int:
    """A per-layer array (some models vary heads by layer) counts as its largest entry."""
    if isinstance(value, tuple):
        return int(max(value, default=0))
    if isinstance(value, (_Skipped, str)):
        raise ValueError(f"{name} is not a number")
    return int(value)


def _split_sizes(sizes: dict[str, int], n_layer: int) -> tuple[tuple[int, ...], int]:
    """Weight bytes per block (blk.N.*), and the bytes of everything outside the blocks."""
    layers = [0] * n_layer
    rest = 0
    for name, size in sizes.items():
        m = _BLOCK_RE.match(name)
        if m and int(m.group(1)) < n_layer:
            layers[int(m.group(1))] += size
        else:
            rest += size
    return tuple(layers), rest


def _vocab_size(kv: dict[str, Any], arch: str, embd: _Tensor | None) -> int:
    """<arch>.vocab_size, else the tokenizer's token count, else token_embd's row count."""
    if f"{arch}.vocab_size" in kv:
        return _widest(kv[f"{arch}.vocab_size"], f"{arch}.vocab_size")
    tokens = kv.get("tokenizer.ggml.tokens")
    if isinstance(tokens, _Skipped):
        return tokens.count
    if isinstance(tokens, tuple):
        return len(tokens)
    return embd.dims[1] if embd and len(embd.dims) > 1 else 0


def _sliding_window(kv: dict[str, Any], arch: str, n_layer: int) -> tuple[int | None, int]:
    """(window, number of SWA blocks) the way llama.cpp's loader decides them.

    An explicit <arch>.attention.sliding_window_pattern wins: an array of
    per-layer flags, or a period.  Otherwise the architecture's fixed period
    applies; an architecture llama.cpp runs without SWA gets 0 layers (its
    cache is then estimated at full size, which never underestimates).
    """
    window = kv.get(f"{arch}.attention.sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None, 0
    pattern = kv.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, tuple):
        return window, sum(1 for flag in pattern[:n_layer] if flag)
    period, dense_first = _SWA_PATTERNS.get(arch, (None, False))
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        period = pattern
    if period is None:
        return None, 0
    return window, swa_layer_count(n_layer, period, dense_first)


def swa_layer_count(n_layer: int, period: int, dense_first: bool = False) -> int:
    """How many blocks llama_hparams::set_swa_pattern(period, dense_first) marks as SWA."""
    if period == 0:
        return n_layer
    if dense_first:
        return sum(1 for il in range(n_layer) if il % period != 0)
    return sum(1 for il in range(n_layer) if il % period < period - 1)


def _file_type(value: Any) -> str | None:
    """general.file_type as llama.cpp names it: 15 -> "Q4_K_M", 1 -> "F16"."""
    if value is None:
        return None
    name = ggml.FILE_TYPE_NAMES.get(int(value))
    if name is None:
        return str(value)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")
