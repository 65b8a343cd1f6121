"""Defaults that fit the node: no ExLlamaV2 engine where no NVIDIA driver is (unless configured),
`plan` exits 0 with the default config, and /v1/models marks the engines that cannot serve now."""

from __future__ import annotations

import os
import subprocess

from supervisor.config import load_settings

from .conftest import CLI, TEST_STATE
from .test_http import http_settings, openai_client


def test_the_default_engines_are_those_the_node_can_run(tmp_path, monkeypatch):
    data = {"data_dir": tmp_path / "data"}
    (tmp_path / "data" / "models" / "exl2").mkdir(parents=True)  # an EXL2 model where the default engine looks
    monkeypatch.setattr("supervisor.config.NVIDIA_DRIVER_FILES", (tmp_path / "no-driver",))
    assert list(load_settings(None, data).engines) == ["llama"]  # no driver: ExLlamaV2 could never serve
    (tmp_path / "driver").write_text("NVRM version: 580")
    monkeypatch.setattr("supervisor.config.NVIDIA_DRIVER_FILES", (tmp_path / "driver",))
    assert list(load_settings(None, data).engines) == ["llama", "exllamav2"]
    (tmp_path / "data" / "models" / "exl2").rmdir()
    assert list(load_settings(None, data).engines) == ["llama"]  # a driver, but no EXL2 model to serve
    configured = tmp_path / "config.toml"
    configured.write_text('[engines.exl2]\nkind = "exllamav2"\n')
    monkeypatch.setattr("supervisor.config.NVIDIA_DRIVER_FILES", (tmp_path / "no-driver",))
    assert list(load_settings(configured).engines) == ["exl2"]  # configured: kept, whatever the node


def test_plan_exits_0_with_the_default_config_on_this_node(tmp_path, shared_state):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NODESUP_")}
    environ.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"))  # no config file: the defaults
    result = subprocess.run(
        [*CLI, "--state-dir", str(tmp_path / "s"), "--data-dir", str(TEST_STATE / "data"), "plan"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "engine llama" in result.stdout


def test_v1_models_marks_the_engines_that_cannot_serve_now(make_daemon):
    engines = {
        "f": {"kind": "fake", "priority": 10, "aliases": ["fast"]},
        "unavailable": {"kind": "fake", "priority": 20, "options": {"fail_load": "unavailable"}, "aliases": ["u"]},
        "missing": {"kind": "llamacpp", "priority": 30, "model": "/nonexistent/missing.gguf"},
    }
    daemon = make_daemon(engines, **http_settings())
    daemon.wait_for(lambda s: {e["name"]: e["state"] for e in s["engines"]}["unavailable"] == "engine_unavailable")
    models = {m.id: m.model_dump()["status"]["value"] for m in openai_client(daemon).models.list().data}
    assert models == {
        "f": "loaded",
        "fast": "loaded",
        "unavailable": "unavailable",
        "u": "unavailable",
        "missing": "unavailable",
    }
    assert openai_client(daemon).models.retrieve("missing").id == "missing"
