"""Configuration: file, environment, flags; invalid values stop with exit 78 naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import ConfigError, load_settings

CLI = [sys.executable, "-m", "supervisor.cli"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_serve_the_default_model_with_one_llamacpp_engine(tmp_path, monkeypatch):
    monkeypatch.delenv("NODESUP_STATE_DIR", raising=False)
    settings = load_settings(None, {"state_dir": tmp_path})
    assert list(settings.engines) == ["llama", "exllamav2"]
    assert settings.engines["llama"].kind == "llamacpp" and settings.engines["llama"].model is None
    assert settings.client_endpoint == f"ipc://{tmp_path}/run/client.sock"
    assert settings.log_dir == tmp_path / "logs" and settings.envs_dir == tmp_path / "envs"


def test_file_then_environment_then_flags(tmp_path, monkeypatch):
    path = write(tmp_path, '[engines.a]\nkind = "llamacpp"\nn_ctx = 1024\nn_threads = 2\n[engines.b]\nkind = "fake"\npriority = 5\n')
    monkeypatch.setenv("NODESUP_ENGINES__A__N_CTX", "4096")
    monkeypatch.setenv("NODESUP_LOG_LEVEL", "debug")
    settings = load_settings(path, {"log_level": "warning"})
    assert settings.engines["a"].n_ctx == 4096  # environment beats the file
    assert settings.engines["a"].n_threads == 2  # the file's other keys stay
    assert settings.engines["b"].priority == 5
    assert settings.log_level == "warning"  # flags beat the environment


@pytest.mark.parametrize(
    "text, key",
    [
        ('[engines.llama]\nkind = "llamacpp"\nn_ctx = -5\n', "engines.llama.n_ctx"),
        ('[engines.llama]\nkind = "vllm"\n', "engines.llama.kind"),
        ('[engines.llama]\nkind = "llamacpp"\nn_ctxx = 5\n', "engines.llama.n_ctxx"),
        ("heartbeat_interval_s = 0\n", "heartbeat_interval_s"),
        ('client_endpoint = "http://x"\n', "client_endpoint"),
        ("max_message_bytes = 'big'\n", "max_message_bytes"),
        ('["engines"."bad name"]\nkind = "fake"\n', "engines"),
        ("no_such_key = 1\n", "no_such_key"),
    ],
)
def test_invalid_value_exits_78_with_one_line_naming_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(path)
    result = subprocess.run([*CLI, "--config", str(path), "run"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_invalid_environment_value_names_the_variable_key(tmp_path, monkeypatch):
    monkeypatch.setenv("NODESUP_MAX_TOKENS_LIMIT", "lots")
    result = subprocess.run([*CLI, "--state-dir", str(tmp_path), "status"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 78 and "max_tokens_limit" in result.stderr


def test_toml_syntax_error_exits_78(tmp_path):
    path = write(tmp_path, "[engines.llama\nkind = \n")
    result = subprocess.run([*CLI, "--config", str(path), "run"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 78 and "invalid TOML" in result.stderr


def test_missing_config_file_exits_78(tmp_path):
    result = subprocess.run([*CLI, "--config", str(tmp_path / "nope.toml"), "run"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 78 and "nope.toml" in result.stderr


def test_example_config_is_valid():
    example = Path(__file__).resolve().parent.parent / "config" / "node-supervisor.example.toml"
    settings = load_settings(example)
    assert settings.engines
