"""Configuration: file, environment, flags; invalid values stop with exit 78 naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import (
    ConfigError,
    EngineConfig,
    GpuConfig,
    load_settings,
    nvidia_driver_present,
    unknown_environment_variables,
)
from supervisor.node.models import model_path_for, model_variants_for
from workers.protocol import ExitCode

CLI = [sys.executable, "-m", "supervisor.cli"]

# ExLlamaV2 is a default engine only where an NVIDIA driver and an EXL2 model are (tests/test_defaults.py).
_EXL2 = (
    nvidia_driver_present()
    and (load_settings(None, {"engines": {"x": {"kind": "fake"}}}).models_home / "exl2").is_dir()
)
DEFAULT_ENGINES = ["llama", *(["exllamav2"] if _EXL2 else [])]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_serve_the_default_model_with_one_llamacpp_engine(tmp_path, monkeypatch):
    monkeypatch.delenv("NODESUP_STATE_DIR", raising=False)
    settings = load_settings(None, {"state_dir": tmp_path})
    assert list(settings.engines) == DEFAULT_ENGINES
    assert settings.engines["llama"].kind == "llamacpp" and settings.engines["llama"].model is None
    assert settings.client_endpoint == f"ipc://{tmp_path}/run/client.sock"
    assert settings.log_dir == tmp_path / "logs" and settings.envs_dir == tmp_path / "envs"


def test_file_then_environment_then_flags(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        '[engines.a]\nkind = "llamacpp"\nn_ctx = 1024\nn_threads = 2\n[engines.b]\nkind = "fake"\npriority = 5\n',
    )
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
        ('[engines.llama]\nkind = "llamacpp"\nn_batch = 0\n', "engines.llama.n_batch"),
        ('[engines.llama]\nkind = "llamacpp"\nflash_attn = "maybe"\n', "engines.llama.flash_attn"),
        ("heartbeat_interval_s = 0\n", "heartbeat_interval_s"),
        ('client_endpoint = "http://x"\n', "client_endpoint"),
        ("max_message_bytes = 'big'\n", "max_message_bytes"),
        ('["engines"."bad name"]\nkind = "fake"\n', "engines"),
        ("no_such_key = 1\n", "no_such_key"),
        ("log_max_bytes = -1\n", "log_max_bytes"),
        ("log_backups = 'five'\n", "log_backups"),
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
    result = subprocess.run(
        [*CLI, "--config", str(tmp_path / "nope.toml"), "run"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 78 and "nope.toml" in result.stderr


def test_example_config_is_valid():
    example = Path(__file__).resolve().parent.parent / "config" / "node-supervisor.example.toml"
    settings = load_settings(example)
    # The file's table replaces the defaults: only its one engine, with its values.
    assert settings.engines == {
        "llama": EngineConfig(kind="llamacpp", n_ctx=2048, n_gpu_layers="auto", priority=10, max_queue=16)
    }
    assert (settings.log_level, settings.heartbeat_interval_s, settings.shutdown_grace_s) == ("info", 1.0, 5.0)


def test_empty_engines_table_is_an_error_and_an_absent_one_means_the_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("NODESUP_ENGINES", raising=False)
    with pytest.raises(ConfigError, match=r"engines: .*at least one engine"):
        load_settings(write(tmp_path, "engines = {}\n"))
    assert list(load_settings(write(tmp_path, 'log_level = "info"\n')).engines) == DEFAULT_ENGINES


def test_config_file_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b'log_level = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as raised:
        load_settings(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("value", ["--index-url x", "[1, ", '{"a": 1}'])
def test_malformed_pip_args_variable_names_the_key(monkeypatch, value):
    monkeypatch.setenv("NODESUP_PIP_ARGS", value)
    with pytest.raises(ConfigError, match="pip_args") as raised:
        load_settings(None)
    assert "\n" not in str(raised.value)


def test_unknown_environment_variables():
    environ = {
        "NODESUP_LOGLEVEL": "debug",  # a typo of LOG_LEVEL
        "NODESUP_LOG_LEVEL": "debug",
        "nodesup_state_dir": "/x",  # settings are read case-insensitively
        "NODESUP_ENGINES__LLAMA__N_CTX": "4096",
        "NODESUP_SUPERVISION__PROBE_TIMEOUT_S": "3",
        "NODESUP_LOG_LEVEL__X": "1",  # a scalar has no nested keys
        "NODESUP_CONFIG": "/etc/x.toml",
        "NODESUP_TEST_STATE": "/x",
        "NODESUP_EXL2_MODEL_DIR": "/x",
        "NODESUP_EXL2_PYTHON": "/x",
        "PATH": "/bin",
    }
    assert unknown_environment_variables(environ) == ["NODESUP_LOGLEVEL", "NODESUP_LOG_LEVEL__X"]


def test_exit_codes_have_one_definition():
    from supervisor import config

    assert not hasattr(config, "EX_CONFIG") and ExitCode.CONFIG == 78
    assert (ExitCode.TEMPFAIL, ExitCode.UNAVAILABLE) == (75, 69)


def test_gpu_table_model_variants_auto_layers_and_cache_types(tmp_path):
    path = write(
        tmp_path,
        "[gpu]\nreserve_mib = 2048\nreserve_percent = 5\n"
        '[engines.a]\nkind = "llamacpp"\nmodel = ["~/m/q6.gguf", "/m/q4.gguf"]\nn_gpu_layers = "auto"\ncache_type = "q8_0"\ncache_types_allowed = ["q4_0"]\n'
        '[engines.b]\nkind = "llamacpp"\nmodel = "/m/one.gguf"\nn_gpu_layers = 20\n',
    )
    settings = load_settings(path)
    a, b = settings.engines["a"], settings.engines["b"]
    assert settings.gpu == GpuConfig(reserve_mib=2048, reserve_percent=5)
    assert (settings.gpu.safety_margin, settings.gpu.cuda_overhead_mib, settings.gpu.min_ctx) == (0.10, 600, 512)
    assert (a.n_gpu_layers, a.uses_gpu, a.cache_type, a.cache_types_allowed) == ("auto", True, "q8_0", ["q4_0"])
    assert model_variants_for(settings, a) == [Path.home() / "m" / "q6.gguf", Path("/m/q4.gguf")]
    assert model_path_for(settings, a) == Path.home() / "m" / "q6.gguf"  # a list serves its first variant
    assert (
        model_variants_for(settings, b) == [Path("/m/one.gguf")] == [model_path_for(settings, b)]
        and b.n_gpu_layers == 20
    )
    assert (b.cache_type, b.cache_types_allowed) == ("f16", [])
    assert model_variants_for(settings, EngineConfig(kind="exllamav2")) == [settings.models_home / "exl2"]
    # "auto" (the default) may use the GPU; the plan in force decides (core.engines.EngineState.uses_gpu).
    assert EngineConfig(kind="llamacpp").n_gpu_layers == "auto" and EngineConfig(kind="llamacpp").uses_gpu
    assert (
        not EngineConfig(kind="llamacpp", n_gpu_layers=0).uses_gpu
        and EngineConfig(kind="llamacpp", n_gpu_layers=-1).uses_gpu
    )


def test_gpu_and_variant_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("NODESUP_ENGINES__A__KIND", "llamacpp")
    monkeypatch.setenv("NODESUP_ENGINES__A__N_GPU_LAYERS", "auto")
    monkeypatch.setenv("NODESUP_ENGINES__A__MODEL", '["/m/a.gguf", "/m/b.gguf"]')
    monkeypatch.setenv("NODESUP_ENGINES__B__KIND", "llamacpp")
    monkeypatch.setenv("NODESUP_ENGINES__B__N_GPU_LAYERS", "7")
    monkeypatch.setenv("NODESUP_ENGINES__B__MODEL", "/m/plain.gguf")
    monkeypatch.setenv("NODESUP_GPU__RESERVE_MIB", "1024")
    settings = load_settings(None)
    assert (
        settings.engines["a"].model == [Path("/m/a.gguf"), Path("/m/b.gguf")]
        and settings.engines["a"].n_gpu_layers == "auto"
    )
    assert settings.engines["b"].model == Path("/m/plain.gguf") and settings.engines["b"].n_gpu_layers == 7
    assert settings.gpu.reserve_mib == 1024
    assert unknown_environment_variables({"NODESUP_GPU__RESERVE_MIB": "1", "NODESUP_GPU__MIN_CTX": "1"}) == []


@pytest.mark.parametrize(
    "text, key",
    [
        ('[engines.llama]\nkind = "llamacpp"\nn_gpu_layers = "all"\n', "engines.llama.n_gpu_layers"),
        ('[engines.llama]\nkind = "llamacpp"\nn_gpu_layers = -2\n', "engines.llama.n_gpu_layers"),
        ('[engines.llama]\nkind = "llamacpp"\nmodel = []\n', "engines.llama.model"),
        ('[engines.llama]\nkind = "llamacpp"\ncache_type = "q5_1"\n', "engines.llama.cache_type"),
        ('[engines.llama]\nkind = "llamacpp"\ncache_types_allowed = ["q2"]\n', "engines.llama.cache_types_allowed"),
        ("[gpu]\nsafety_margin = 2\n", "gpu.safety_margin"),
        ("[gpu]\nreserve_percent = 100\n", "gpu.reserve_percent"),
        ("[gpu]\nmin_ctx = 0\n", "gpu.min_ctx"),
        ("[gpu]\nreserve = 1\n", "gpu.reserve"),
    ],
)
def test_invalid_gpu_and_planning_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(write(tmp_path, text))


def test_example_config_gpu_table_is_the_defaults():
    example = Path(__file__).resolve().parent.parent / "config" / "node-supervisor.example.toml"
    assert load_settings(example).gpu == GpuConfig()


@pytest.mark.parametrize(
    "text, key",
    [
        ('[engines.remote]\nkind = "fake"\nprice_input_per_mtok = -0.5\n', "engines.remote.price_input_per_mtok"),
        ('[engines.remote]\nkind = "fake"\nprice_output_per_mtok = -1\n', "engines.remote.price_output_per_mtok"),
        ('[engines.remote]\nkind = "fake"\nprice_output_per_mtok = nan\n', "engines.remote.price_output_per_mtok"),
        ('[engines.remote]\nkind = "fake"\ndaily_budget = 0\n', "engines.remote.daily_budget"),
        ('[engines.remote]\nkind = "fake"\ndaily_budget = "lots"\n', "engines.remote.daily_budget"),
        ('[metrics]\nlisten = "0.0.0.0:9464"\n', "metrics.listen"),
        ('[metrics]\nlisten = "127.0.0.1"\n', "metrics.listen"),
        ('[metrics]\nlisten = "127.0.0.1:70000"\n', "metrics.listen"),
        ("[metrics]\nport = 9464\n", "metrics.port"),
    ],
)
def test_invalid_accounting_and_metrics_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(write(tmp_path, text))


def test_accounting_and_metrics_keys_and_their_defaults(tmp_path):
    settings = load_settings(
        write(
            tmp_path,
            '[metrics]\nlisten = "[::1]:9464"\n[engines.remote]\nkind = "fake"\n'
            "price_input_per_mtok = 0.5\nprice_output_per_mtok = 1.5\ndaily_budget = 2\n",
        )
    )
    remote = settings.engines["remote"]
    assert (remote.price_input_per_mtok, remote.price_output_per_mtok, remote.daily_budget) == (0.5, 1.5, 2.0)
    assert settings.metrics.listen == "[::1]:9464"
    defaults = load_settings(None, {"state_dir": tmp_path})
    assert defaults.metrics.listen is None  # off unless asked for
    assert all(
        (e.price_input_per_mtok, e.price_output_per_mtok, e.daily_budget) == (0, 0, None)
        for e in defaults.engines.values()
    )
