"""Models users can name: every GGUF file and EXL2 directory in ``models_dir`` becomes an
engine (name = the file's stem, kind from the format, the engine defaults, loaded on
demand); an ``[engines.NAME]`` table of the same name overrides or adds settings.

Only a file's first bytes are read (the GGUF magic and header counts), so a scan of a
directory of multi-GB files is cheap enough for every reload.  A file that is not what
its name says (not GGUF, truncated, unreadable) is listed unavailable with the reason,
never raised.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
GGUF_HEADER_BYTES = 24  # magic, version (u32), tensor count (u64), metadata count (u64)
GGUF_VERSIONS = (2, 3)
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<parts>\d{5})$")  # llama.cpp's split files
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class FoundModel:
    name: str  # the engine's name
    kind: str  # llamacpp (GGUF) or exllamav2 (EXL2 directory); "" when unavailable
    path: str
    reason: str | None = None  # why it cannot be served; None: available
    alias: str | None = None  # the file's own stem, where the engine name had to differ

    @property
    def available(self) -> bool:
        return self.reason is None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind or None, "path": self.path, "reason": self.reason}


def engine_name(stem: str) -> str:
    """An engine name from a file's stem: letters, digits, '-' and '_' (others become '-'), at most 64."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", stem).strip("-_")[:64] or "model"
    return name if _NAME_OK.match(name) else f"m{name}"[:64]


def check_gguf(path: Path) -> str | None:
    """Why ``path`` is not a loadable GGUF file, or None."""
    try:
        with path.open("rb") as handle:
            header = handle.read(GGUF_HEADER_BYTES)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if header[:4] != GGUF_MAGIC:
        return f"not a GGUF file (starts with {header[:4]!r})"
    if len(header) < GGUF_HEADER_BYTES:
        return f"truncated: {len(header)} bytes, not even a GGUF header"
    version, tensors, metadata = struct.unpack("<IQQ", header[4:])
    if version not in GGUF_VERSIONS:
        return f"GGUF version {version} (llama.cpp reads {' and '.join(map(str, GGUF_VERSIONS))})"
    if tensors == 0 or tensors > 1_000_000 or metadata > 1_000_000:
        return f"damaged GGUF header ({tensors} tensors, {metadata} metadata keys)"
    return None


def _exl2_problem(directory: Path) -> str | None:
    if not any(directory.glob("*.safetensors")):
        return "an EXL2 directory needs .safetensors files beside config.json"
    return None


def scan(directories: list[Path]) -> tuple[list[FoundModel], list[str]]:
    """Every model in ``directories`` (first directory first; a name already taken is
    listed unavailable), and a line for each directory that cannot be read."""
    found: list[FoundModel] = []
    problems: list[str] = []
    taken: set[str] = set()
    for directory in directories:
        directory = Path(directory).expanduser()
        try:
            entries = sorted(directory.iterdir())
        except FileNotFoundError:
            problems.append(f"models_dir {directory}: not found")
            continue
        except OSError as exc:
            problems.append(f"models_dir {directory}: unreadable: {exc.strerror or exc}")
            continue
        for entry in entries:
            model = _model_at(entry)
            if model is None:
                continue
            if model.name in taken:
                model = FoundModel(model.name, "", model.path, f"the name {model.name!r} is taken by an earlier file")
            taken.add(model.name)
            found.append(model)
    return found, problems


def _model_at(entry: Path) -> FoundModel | None:
    if entry.name.startswith("."):
        return None
    if entry.suffix.lower() == ".gguf":
        stem = entry.stem
        split = _SPLIT.match(stem)
        if split is not None:
            if int(split["part"]) != 1:
                return None  # the first part stands for the whole model (llama.cpp opens the rest)
            stem = split["stem"]
        name = engine_name(stem)
        alias = stem if name != stem else None
        problem = check_gguf(entry) if entry.is_file() else "not a regular file"
        return FoundModel(name, "" if problem else "llamacpp", str(entry), problem, alias)
    if entry.is_dir() and (entry / "config.json").is_file():
        name = engine_name(entry.name)
        problem = _exl2_problem(entry)
        return FoundModel(name, "" if problem else "exllamav2", str(entry), problem, None)
    return None


def merge_engines(raw_engines: dict[str, Any], found: list[FoundModel]) -> Any:
    """The engines table (as configured, or the defaults) with the models found added: an
    ``[engines.NAME]`` table of a found model's name keeps its settings over the found ones.  A file
    a configured engine already names as its model is not added again."""
    engines = dict(raw_engines)
    named = {_resolved(e.get("model") if isinstance(e, dict) else getattr(e, "model", None)) for e in engines.values()}
    for model in found:
        if not model.available or _resolved(model.path) in named:
            continue
        entry = {"kind": model.kind, "model": model.path, "standby": "cold"}
        if model.alias is not None:
            entry["aliases"] = [model.alias]
        user = engines.get(model.name)
        if user is None:
            engines[model.name] = entry
        elif isinstance(user, dict):
            engines[model.name] = {**entry, **user}
    return engines


def _resolved(path: Any) -> str | None:
    if not isinstance(path, (str, Path)):
        return None
    try:
        return str(Path(path).expanduser().resolve())
    except OSError:
        return str(path)
