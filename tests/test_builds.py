"""Engine libraries compiled from source: one wheel per machine and build options."""

from __future__ import annotations

import json
import platform
import subprocess

import pytest

from pathlib import Path
from typing import Any

from supervisor.node import builds, envs
from supervisor.node.builds import BuildChoice, NodeFacts
from supervisor.config import load_settings
from supervisor.node.envs import MARKER, create_env, env_is_current, env_python, requirements_file, stale_reason

from .conftest import shared_settings

GPU_NODE = NodeFacts(driver="NVIDIA driver 580.95.05 (1 GPU)", nvcc="/opt/cuda/bin/nvcc", compute_caps=("86",))
TWO_ARCH_NODE = NodeFacts(
    driver="NVIDIA driver (/proc/driver/nvidia/version)", nvcc="/opt/cuda/bin/nvcc", compute_caps=("86", "89")
)
DRIVER_NO_NVCC = NodeFacts(driver="NVIDIA driver 580.95.05 (1 GPU)", nvcc=None, compute_caps=("86",))
CPU_NODE = NodeFacts(driver=None, nvcc="/opt/cuda/bin/nvcc", no_driver="no NVIDIA driver (libnvidia-ml not found)")
REQUIREMENT = "llama-cpp-python==0.3.36"


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
def test_the_shared_environment_is_judged_by_the_node_not_the_callers_shell(shared_state, monkeypatch):
    # Read only: the marker of the test state's llama.cpp build, CPU-only on a node without a GPU.
    settings = shared_settings()
    assert env_is_current(settings, "llamacpp", "llamacpp")
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")  # a shell's leftover says nothing about the node
    monkeypatch.setattr(builds, "node_facts", lambda: CPU_NODE)
    assert env_is_current(settings, "llamacpp", "llamacpp")
    monkeypatch.delenv("CMAKE_ARGS")
    monkeypatch.setattr(builds, "node_facts", lambda: GPU_NODE)  # the same state on a GPU node: build again, with CUDA
    assert "NVIDIA driver 580.95.05" in (stale_reason(settings, "llamacpp", "llamacpp") or "")


@pytest.mark.real_engine
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AMX is an x86-64 extension")
def test_llama_cpp_build_has_no_amx_kernels(shared_state):
    # llama.cpp's AMX kernels crash on Q4_K models (ggml-org/llama.cpp#20824);
    # a -march=native build on an AMX CPU would report AMX_INT8 = 1 here.
    python = env_python(shared_state["envs_dir"] / "llamacpp")
    info = subprocess.run(
        [str(python), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "AVX2 = 1" in info or "NEON = 1" in info, info  # the build did use the CPU's vector extensions
    assert "AMX" not in info, info


# --- which build the node calls for, and when an environment is stale -------------------------------


def settings_in(tmp_path: Path, **overrides: Any):
    return load_settings(None, {"state_dir": tmp_path / "state", "data_dir": tmp_path / "data", **overrides})


class FakeVenv:
    """venv.EnvBuilder without ensurepip: a python placeholder and pyvenv.cfg, in milliseconds."""

    made: list[dict[str, Any]] = []

    def __init__(self, **options: Any) -> None:
        self.options = options

    def create(self, path: Path) -> None:
        FakeVenv.made.append({"path": path, **self.options})
        env_python(path).parent.mkdir(parents=True, exist_ok=True)
        env_python(path).write_text("")
        flag = "true" if self.options.get("system_site_packages") else "false"
        (path / "pyvenv.cfg").write_text(f"home = /usr/bin\ninclude-system-site-packages = {flag}\n")


@pytest.fixture
def toolchain(tmp_path, monkeypatch):
    """create_env with pip, venv and the compiler replaced by recorders; the node is a GPU node unless a test says otherwise."""
    commands: list[tuple[list[str], dict[str, str] | None]] = []

    def run(command: list[str], on_line, env: dict[str, str] | None = None) -> int:
        commands.append((command, env))
        if command[3:4] == ["wheel"]:
            target = Path(command[command.index("-w") + 1])
            (target / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
        return 0

    FakeVenv.made = []
    monkeypatch.setattr(envs, "run_streaming", run)
    monkeypatch.setattr(envs.venv, "EnvBuilder", FakeVenv)
    monkeypatch.setattr(builds, "wheel_cache_root", lambda: tmp_path / "wheels")
    for module in (builds, envs):
        monkeypatch.setattr(module, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(builds, "node_facts", lambda: GPU_NODE)
    for var in ("CMAKE_ARGS", "CUDACXX"):
        monkeypatch.delenv(var, raising=False)
    return commands


def recorded(settings, name: str = "llamacpp") -> dict[str, Any]:
    return json.loads((settings.envs_dir / name / MARKER).read_text())


def test_desired_build_follows_the_node_and_llama_cuda():
    auto, on, off = (settings_in(Path("/nonexistent"), llama_cuda=v) for v in ("auto", "on", "off"))
    assert builds.desired_build(auto, GPU_NODE) == BuildChoice(
        True,
        "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86",
        "auto: NVIDIA driver 580.95.05 (1 GPU) and nvcc (/opt/cuda/bin/nvcc)",
    )
    assert builds.desired_build(auto, TWO_ARCH_NODE).cmake_args == "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86;89"
    assert builds.desired_build(auto, CPU_NODE) == BuildChoice(
        False, "", "auto: no NVIDIA driver (libnvidia-ml not found)"
    )
    no_nvcc = builds.desired_build(auto, DRIVER_NO_NVCC)
    assert not no_nvcc.cuda and "no nvcc" in no_nvcc.reason
    assert builds.desired_build(on, CPU_NODE) == BuildChoice(True, "-DGGML_CUDA=on", 'llama_cuda = "on"')
    assert builds.desired_build(off, GPU_NODE) == BuildChoice(False, "", 'llama_cuda = "off"')


def test_explicit_cmake_args_win_over_the_node(tmp_path, monkeypatch):
    settings = settings_in(tmp_path)
    monkeypatch.setattr(builds, "node_facts", lambda: GPU_NODE)
    given = builds.build_choice(settings, {"CMAKE_ARGS": "-DGGML_CUDA=ON -DGGML_CUDA_F16=on"})
    assert given == BuildChoice(
        True, "-DGGML_CUDA=ON -DGGML_CUDA_F16=on", "CMAKE_ARGS given by the caller", explicit=True
    )
    assert builds.build_choice(settings, {"CMAKE_ARGS": "-DGGML_CUDA=off"}).cuda is False
    assert builds.build_choice(settings, {"CMAKE_ARGS": "  "}) == builds.desired_build(settings, GPU_NODE)


def test_a_cuda_build_stays_current_when_the_daemon_runs_without_cmake_args(tmp_path, toolchain):
    settings = settings_in(tmp_path)
    create_env(settings, "llamacpp", "llamacpp", lambda line: None)
    (wheel_command, environ), (install_command, _) = toolchain
    assert (
        environ["CMAKE_ARGS"] == "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86"
        and environ["CUDACXX"] == "/opt/cuda/bin/nvcc"
    )
    build = recorded(settings)["build"]
    assert build["cuda"] is True and build["explicit"] is False and build["cmake_args"] == environ["CMAKE_ARGS"]
    assert build["cpu"] == builds.cpu_digest()
    assert env_is_current(settings, "llamacpp", "llamacpp")  # under systemd: no CMAKE_ARGS in sight


def test_a_cuda_environment_recorded_before_build_options_stays_current_without_cmake_args(tmp_path, monkeypatch):
    # The marker an older `CMAKE_ARGS="-DGGML_CUDA=on" envs create` wrote: the build key alone.
    settings = settings_in(tmp_path)
    key = builds.build_key(REQUIREMENT, builds.build_environ({"CMAKE_ARGS": "-DGGML_CUDA=on"}))
    FakeVenv().create(settings.envs_dir / "llamacpp")
    sha = envs._digest(requirements_file("llamacpp").read_text())
    (settings.envs_dir / "llamacpp" / MARKER).write_text(
        json.dumps({"kind": "llamacpp", "requirements_sha": sha, "build_key": key})
    )
    monkeypatch.setattr(builds, "node_facts", lambda: GPU_NODE, raising=False)
    for var in ("CMAKE_ARGS", "CFLAGS", "CXXFLAGS"):
        monkeypatch.delenv(var, raising=False)
    assert env_is_current(settings, "llamacpp", "llamacpp")


def test_a_cpu_build_on_a_node_that_now_wants_cuda_is_stale(tmp_path, toolchain, monkeypatch):
    settings = settings_in(tmp_path)
    monkeypatch.setattr(builds, "node_facts", lambda: CPU_NODE)
    create_env(settings, "llamacpp", "llamacpp", lambda line: None)
    assert toolchain[0][1]["CMAKE_ARGS"] == "" and "CUDACXX" not in toolchain[0][1]
    assert recorded(settings)["build"]["cuda"] is False
    assert env_is_current(settings, "llamacpp", "llamacpp")
    monkeypatch.setattr(builds, "node_facts", lambda: GPU_NODE)  # a GPU and its driver arrived
    assert stale_reason(settings, "llamacpp", "llamacpp") == (
        "a CPU-only build, and the node calls for a CUDA one (auto: NVIDIA driver 580.95.05 (1 GPU) and nvcc (/opt/cuda/bin/nvcc))"
    )
    assert env_is_current(settings_in(tmp_path, llama_cuda="off"), "llamacpp", "llamacpp")


def test_explicit_cmake_args_are_recorded_and_respected(tmp_path, toolchain, monkeypatch):
    settings = settings_in(tmp_path)
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS")
    create_env(settings, "llamacpp", "llamacpp", lambda line: None)
    assert toolchain[0][1]["CMAKE_ARGS"] == "-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS"
    build = recorded(settings)["build"]
    assert build == {
        **build,
        "cuda": False,
        "explicit": True,
        "cmake_args": "-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS",
    }
    monkeypatch.delenv("CMAKE_ARGS")
    assert env_is_current(settings, "llamacpp", "llamacpp")  # the GPU node would want CUDA; the caller chose otherwise


def test_a_build_from_another_cpu_is_stale(tmp_path, toolchain, monkeypatch):
    settings = settings_in(tmp_path)
    create_env(settings, "llamacpp", "llamacpp", lambda line: None)
    monkeypatch.setattr(builds, "_cpu_flags", lambda: "sse2")
    assert stale_reason(settings, "llamacpp", "llamacpp") == "built on a CPU with other features"


def test_the_wheel_cache_is_keyed_by_the_build_options(tmp_path, toolchain, monkeypatch):
    settings = settings_in(tmp_path)
    create_env(settings, "llamacpp", "llamacpp", lambda line: None)
    create_env(settings, "llamacpp", "llamacpp", lambda line: None)
    assert [c[3] for c, _ in toolchain] == ["wheel", "install", "install"]  # the second time, from the cache
    cuda_key = recorded(settings)["build_key"]
    assert (tmp_path / "wheels" / cuda_key).is_dir()
    monkeypatch.setattr(builds, "node_facts", lambda: CPU_NODE)
    create_env(settings, "llamacpp", "llamacpp", lambda line: None)
    assert [c[3] for c, _ in toolchain][3:] == ["wheel", "install"] and recorded(settings)["build_key"] != cuda_key


def test_llama_cuda_on_without_nvcc_says_so_before_compiling(tmp_path, toolchain, monkeypatch):
    for module in (builds, envs):
        monkeypatch.setattr(module, "find_nvcc", lambda: None)
    monkeypatch.setattr(builds, "node_facts", lambda: NodeFacts(driver=None, nvcc=None))
    with pytest.raises(envs.EnvError, match="no nvcc"):
        create_env(settings_in(tmp_path, llama_cuda="on"), "llamacpp", "llamacpp", lambda line: None)
    assert toolchain == []
