"""Engine libraries compiled from source: one wheel per machine and build options."""

from __future__ import annotations

import json
import platform
import subprocess

import pytest

from supervisor import builds
from supervisor.envs import MARKER, env_is_current, env_python, requirements_file

from .conftest import shared_settings


def test_build_key_follows_options_cpu_and_version(monkeypatch):
    environ = {"CMAKE_ARGS": "", "CFLAGS": "", "CXXFLAGS": ""}
    key = builds.build_key("llama-cpp-python==0.3.36", environ)
    assert builds.build_key("llama-cpp-python==0.3.36", dict(environ)) == key
    assert builds.build_key("llama-cpp-python==0.3.37", environ) != key
    assert builds.build_key("llama-cpp-python==0.3.36", {**environ, "CMAKE_ARGS": "-DGGML_CUDA=on"}) != key
    monkeypatch.setattr(builds, "_cpu_flags", lambda: "sse2 avx2")
    assert builds.build_key("llama-cpp-python==0.3.36", environ) != key


def test_build_environment_keeps_the_callers_flags_and_leaves_out_amx_on_x86():
    environ = builds.build_environ({"CFLAGS": "-O2", "CMAKE_ARGS": "-DGGML_CUDA=on"})
    assert environ["CMAKE_ARGS"] == "-DGGML_CUDA=on"
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert environ["CFLAGS"] == f"-O2 {builds.NO_AMX}"
        assert environ["CXXFLAGS"] == builds.NO_AMX
    else:
        assert environ["CFLAGS"] == "-O2" and "CXXFLAGS" not in environ


def test_pinned_requirement_is_read_from_the_requirements_file():
    assert builds.pinned_requirement(requirements_file("llamacpp"), "llama-cpp-python") == "llama-cpp-python==0.3.36"
    assert builds.pinned_requirement(requirements_file("llamacpp"), "torch") is None


@pytest.mark.real_engine
def test_environment_records_its_build_and_is_stale_under_other_options(shared_state, monkeypatch):
    settings = shared_settings()
    recorded = json.loads((settings.envs_dir / "llamacpp" / MARKER).read_text())
    assert recorded["build_key"] == builds.build_key("llama-cpp-python==0.3.36", builds.build_environ())
    assert env_is_current(settings, "llamacpp", "llamacpp")
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    assert not env_is_current(settings, "llamacpp", "llamacpp")


@pytest.mark.real_engine
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AMX is an x86-64 extension")
def test_llama_cpp_build_has_no_amx_kernels(shared_state):
    # llama.cpp's AMX kernels crash on Q4_K models (ggml-org/llama.cpp#20824);
    # a -march=native build on an AMX CPU would report AMX_INT8 = 1 here.
    python = env_python(shared_state["envs_dir"] / "llamacpp")
    info = subprocess.run(
        [str(python), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "AVX2 = 1" in info or "NEON = 1" in info, info  # the build did use the CPU's vector extensions
    assert "AMX" not in info, info
