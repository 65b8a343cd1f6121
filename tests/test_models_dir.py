"""models_dir: every GGUF file and EXL2 directory becomes an engine users can name;
[engines.NAME] overrides; bad files are listed unavailable with the reason."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from supervisor.config import ConfigError, load_settings
from supervisor.config.discovery import scan


def gguf_header(tensors: int = 3, metadata: int = 2, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, metadata)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    (directory / "chat.gguf").write_bytes(gguf_header() + b"\0" * 64)
    (directory / "coder.Q4_K_M.gguf").write_bytes(gguf_header() + b"\0" * 64)
    (directory / "big-00001-of-00002.gguf").write_bytes(gguf_header() + b"\0" * 64)
    (directory / "big-00002-of-00002.gguf").write_bytes(b"\0" * 64)
    (directory / "garbage.gguf").write_bytes(b"this is not a model")
    (directory / "short.gguf").write_bytes(b"GGUF\x03\0")
    (directory / "README.txt").write_text("not a model, not listed")
    exl2 = directory / "llama-exl2-4bpw"
    exl2.mkdir()
    (exl2 / "config.json").write_text("{}")
    (exl2 / "output.safetensors").write_bytes(b"\0" * 8)
    empty = directory / "half-copied"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    return directory


def settings(directories: list[Path], engines: dict | None = None, **more):
    values = {"state_dir": "/nonexistent/state", "models_dir": directories, **more}
    if engines is not None:
        values["engines"] = engines
    return load_settings(None, values)


def test_each_model_file_and_exl2_directory_becomes_an_engine_loaded_on_demand(models):
    engines = settings([models]).engines
    assert {"chat", "coder-Q4_K_M", "big", "llama-exl2-4bpw"} <= set(engines)
    chat = engines["chat"]
    assert (chat.kind, Path(chat.model), chat.standby, chat.keep_alive_s) == (
        "llamacpp",
        models / "chat.gguf",
        "cold",
        300,
    )
    assert engines["llama-exl2-4bpw"].kind == "exllamav2"
    assert engines["coder-Q4_K_M"].aliases == ["coder.Q4_K_M"]  # the file's own name still reaches it over HTTP
    assert "llama" in engines  # no [engines] table: the defaults stay beside them
    for bad in ("garbage", "short", "half-copied", "big-00002-of-00002"):
        assert bad not in engines


def test_an_engines_table_of_the_same_name_overrides_settings_and_needs_no_kind(models):
    engines = settings([models], {"chat": {"keep_alive": 30, "pinned": True, "n_ctx": 4096}}).engines
    chat = engines["chat"]
    assert (chat.kind, chat.keep_alive_s, chat.pinned, chat.n_ctx) == ("llamacpp", 30, True, 4096)
    assert "llama" not in engines  # an [engines] table replaces the defaults, as it always has


def test_bad_files_and_directories_are_listed_unavailable_with_the_reason(models, tmp_path):
    found, problems = scan([models, tmp_path / "missing"])
    reasons = {m.name: m.reason for m in found if not m.available}
    assert reasons["garbage"].startswith("not a GGUF file")
    assert reasons["short"].startswith("truncated")
    assert "safetensors" in reasons["half-copied"]
    assert problems == [f"models_dir {tmp_path / 'missing'}: not found"]


def test_an_engine_with_no_kind_and_no_model_file_of_its_name_is_refused_naming_the_key(models):
    with pytest.raises(ConfigError, match=r"engines\.nosuch\.kind: Field required"):
        settings([models], {"nosuch": {"keep_alive": 5}})
    with pytest.raises(ConfigError, match=r"models_dir: Input should be a valid list"):
        load_settings(None, {"state_dir": "/nonexistent", "models_dir": "/not/a/list"})


def test_the_default_models_dir_is_the_data_directorys_models(models, tmp_path):
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / "pulled.gguf").write_bytes(gguf_header())
    loaded = load_settings(None, {"state_dir": "/nonexistent", "data_dir": data})
    assert loaded.model_dirs == [data / "models"] and "pulled" in loaded.engines


def test_a_file_a_configured_engine_already_serves_is_not_added_again(models):
    engines = settings([models], {"mine": {"kind": "llamacpp", "model": str(models / "chat.gguf")}}).engines
    assert "chat" not in engines and "mine" in engines
