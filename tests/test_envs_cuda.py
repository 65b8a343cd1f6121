"""Engine environments on GPU nodes: the node's torch reused, the env's own NumPy first, pip_args
everywhere (offline wheel folders), and what `envs check` says about the build."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from supervisor.node import envs
from supervisor.cli.envs_command import _print_check
from supervisor.config import ConfigError, load_settings
from supervisor.node.envs import MARKER, create_env, env_is_current, env_python, stale_reason

from .test_builds import FakeVenv, recorded, settings_in, toolchain  # noqa: F401  (toolchain is a fixture)
from .test_gpu_probe import CPU_BUILD_FACTS, NO_GPU
from .test_gpu_probe import GPU_NODE as GPU_SNAPSHOT

PIP_ARGS = ["--no-index", "--find-links", "/srv/wheels"]


def pip_commands(commands: list[tuple[list[str], dict | None]]) -> list[list[str]]:
    return [command for command, _ in commands if command[1:3] == ["-m", "pip"]]


def test_pip_args_reach_every_pip_call_including_the_llama_cpp_build(tmp_path, toolchain, monkeypatch):
    monkeypatch.setattr(envs, "node_packages", lambda path, names, on_line: {"torch": "2.13.0+cu128"})
    settings = settings_in(tmp_path, pip_args=PIP_ARGS)
    create_env(settings, "llamacpp", "llamacpp", lambda line: None)
    create_env(
        settings_in(tmp_path, pip_args=PIP_ARGS, envs={"exllamav2": {"system_site_packages": True}}),
        "exllamav2",
        "exllamav2",
        lambda line: None,
    )
    commands = pip_commands(toolchain)
    assert [c[3] for c in commands] == ["wheel", "install", "install", "install"]
    assert all(c[-3:] == PIP_ARGS for c in commands), commands


def test_system_site_packages_leaves_torch_to_the_node_and_pins_the_rest_into_the_env(tmp_path, toolchain, monkeypatch):
    monkeypatch.setattr(envs, "node_packages", lambda path, names, on_line: {"torch": "2.13.0+cu128"})
    settings = settings_in(tmp_path, envs={"exllamav2": {"system_site_packages": True}})
    create_env(settings, "exllamav2", "exllamav2", lambda line: None)
    assert FakeVenv.made[-1]["system_site_packages"] is True
    own_only, fill_in = pip_commands(toolchain)
    assert (
        own_only[3:6] == ["install", "--progress-bar", "off"]
        and "--ignore-installed" in own_only
        and "--no-deps" in own_only
    )
    assert "--ignore-installed" not in fill_in
    used = Path(own_only[own_only.index("-r") + 1])
    assert used == Path(fill_in[fill_in.index("-r") + 1]) and used.parent == settings.envs_dir / "exllamav2"
    lines = used.read_text().splitlines()
    assert (
        "numpy==1.26.4" in lines and "exllamav2==0.3.2" in lines and not any(line.startswith("torch") for line in lines)
    )
    marker = recorded(settings, "exllamav2")
    assert marker["system_site_packages"] is True and marker["reused"] == {"torch": "2.13.0+cu128"}
    assert env_is_current(settings, "exllamav2", "exllamav2")
    plain = settings_in(tmp_path)  # the option turned off again: the env must be made without the node's packages
    assert stale_reason(plain, "exllamav2", "exllamav2") == "system_site_packages changed in the configuration"
    create_env(plain, "exllamav2", "exllamav2", lambda line: None)
    assert FakeVenv.made[-1]["system_site_packages"] is False and FakeVenv.made[-1]["clear"] is True


def test_without_the_option_the_env_is_made_as_before(tmp_path, toolchain):
    settings = settings_in(tmp_path)
    create_env(settings, "exllamav2", "exllamav2", lambda line: None)
    (install,) = pip_commands(toolchain)
    assert install[-2:] == ["-r", str(envs.requirements_file("exllamav2"))] and "--ignore-installed" not in install
    assert FakeVenv.made[-1]["system_site_packages"] is False


# --- a real environment that sees the node's site-packages ---------------------------------------------

# Small pure-Python distributions whose import name is their name; the base interpreter has some of them.
CANDIDATES = ("six", "colorama", "idna", "certifi", "iniconfig", "pluggy", "typing_extensions")


def node_dists() -> dict[str, str]:
    """Candidates in the base interpreter's own site-packages (what a venv with system site packages sees)."""
    code = (
        "import json, sys, sysconfig\nfrom importlib import metadata\nfound = {}\n"
        "for n in sys.argv[1:]:\n    try:\n        d = metadata.distribution(n)\n    except metadata.PackageNotFoundError:\n        continue\n"
        "    if str(d.locate_file('')).startswith(sysconfig.get_paths()['purelib']):\n        found[n] = d.version\n"
        "print(json.dumps(found))"
    )
    result = subprocess.run(
        [sys._base_executable, "-I", "-c", code, *CANDIDATES], capture_output=True, text=True, timeout=60
    )
    return json.loads(result.stdout) if result.returncode == 0 else {}


def fake_wheel(folder: Path, dist: str, version: str) -> Path:
    """A pure-Python wheel of ``dist`` whose module says it came from the environment."""
    files = {
        f"{dist}/__init__.py": f"WHERE = 'env'\n__version__ = {version!r}\n",
        f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{dist}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},{len(text.encode())}"
        for name, text in files.items()
    ]
    files[f"{dist}-{version}.dist-info/RECORD"] = "\n".join([*record, f"{dist}-{version}.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def imported(python: Path, module: str) -> tuple[str, str]:
    code = f"import {module}; print(getattr({module}, 'WHERE', 'node')); print({module}.__file__)"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    where, file = result.stdout.split("\n")[:2]
    return where, file


def test_the_envs_own_pinned_package_comes_before_the_nodes_copy(tmp_path, monkeypatch):
    found = node_dists()
    if len(found) < 2:
        pytest.skip(f"the base interpreter has fewer than two of {CANDIDATES} to stand for the node's packages")
    (shadowed, version), (reused, reused_version) = list(found.items())[:2]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, shadowed, version)  # the node's very version: pip alone would call it satisfied
    requirements = tmp_path / "requirements"
    requirements.mkdir()
    (requirements / "fake.txt").write_text(
        f"{shadowed}=={version}\n{reused}==999.0  # nowhere to install it from: the node's copy serves\n"
    )
    monkeypatch.setattr(envs, "REQUIREMENTS_DIR", requirements)
    monkeypatch.setattr(envs, "REUSED_FROM_NODE", (reused,))
    offline = ["--no-index", "--find-links", str(wheels)]  # an offline node's wheel folder, through pip_args
    settings = settings_in(tmp_path, pip_args=offline, envs={"fake": {"system_site_packages": True}})
    create_env(settings, "fake", "fake", lambda line: print(line))
    env, python = settings.envs_dir / "fake", env_python(settings.envs_dir / "fake")
    where, file = imported(python, shadowed)
    assert where == "env" and Path(file).is_relative_to(env), file
    where, file = imported(python, reused)
    assert where == "node" and not Path(file).is_relative_to(env), file
    assert json.loads((env / MARKER).read_text())["reused"] == {reused: reused_version}

    # Control: the same venv made by plain `pip install` keeps the node's copy, the trap the env build avoids.
    control = tmp_path / "control"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(control)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(env_python(control)),
        "install",
        *offline,
        f"{shadowed}=={version}",
    ]
    result = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "already satisfied" in result.stdout, result.stdout + result.stderr
    assert imported(env_python(control), shadowed)[0] == "node"


# --- what `envs check` says ----------------------------------------------------------------------------

CHECKED = {
    **CPU_BUILD_FACTS,
    "executable": "/srv/envs/llamacpp/bin/python",
    "python": "3.11.7",
    "stale": None,
    "reused": {},
    "numpy_file": "/srv/envs/llamacpp/lib/python3.11/site-packages/numpy/__init__.py",
    "numpy_own": True,
    "build": {
        "cuda": False,
        "cmake_args": "",
        "explicit": False,
        "reason": "auto: NVIDIA driver 580.95.05 (1 GPU) but no nvcc (PATH, CUDA_HOME, /usr/local/cuda/bin); install the CUDA toolkit",
        "cpu": "0",
    },
}


def test_envs_check_on_a_gpu_node_with_a_cpu_only_build_warns_and_names_the_fix(capsys):
    _print_check("llamacpp", CHECKED, GPU_SNAPSHOT)
    out = capsys.readouterr().out
    assert "  build         CPU (auto: NVIDIA driver 580.95.05 (1 GPU) but no nvcc" in out
    assert "  gpu offload   no; GPU backends built: none (CPU-only build)" in out
    assert "  node GPUs     1 NVIDIA GPU(s), driver 580.95.05, CUDA 13.0" in out
    (warning,) = [line for line in out.splitlines() if line.startswith("  WARNING")]
    assert 'CMAKE_ARGS="-DGGML_CUDA=on" node-supervisor envs create llamacpp' in warning and "RTX 3060" in warning


def test_envs_check_reports_a_cuda_build_without_warning(capsys):
    engine = {**CPU_BUILD_FACTS["engine"], "gpu_offload": True, "gpu_backends_built": ["cuda"]}
    build = {
        **CHECKED["build"],
        "cuda": True,
        "cmake_args": "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86",
        "reason": "auto: NVIDIA driver 580.95.05 (1 GPU) and nvcc (/usr/local/cuda/bin/nvcc)",
    }
    _print_check("llamacpp", {**CHECKED, "engine": engine, "build": build}, GPU_SNAPSHOT)
    out = capsys.readouterr().out
    assert '  build         CUDA (CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86"; auto: NVIDIA driver' in out
    assert "  gpu offload   yes; GPU backends built: cuda" in out and "WARNING" not in out and "recreate" not in out


def test_envs_check_without_a_gpu_keeps_the_hint_says_why_stale_and_where_numpy_comes_from(capsys):
    facts = {
        **CHECKED,
        "current": False,
        "stale": "built on a CPU with other features",
        "numpy_own": False,
        "numpy_file": "/usr/lib/python3/dist-packages/numpy/__init__.py",
    }
    _print_check("llamacpp", facts, NO_GPU)
    out = capsys.readouterr().out
    assert "  up to date    no: built on a CPU with other features; run envs create llamacpp" in out
    assert (
        "numpy         2.3.5 (from /usr/lib/python3/dist-packages/numpy/__init__.py, not the environment's own!)" in out
    )
    assert "  node GPUs     no NVIDIA driver (libnvidia-ml not found)" in out and "WARNING" not in out
    assert 'to use a GPU, recreate with CMAKE_ARGS="-DGGML_CUDA=on"' in out


# --- configuration -------------------------------------------------------------------------------------


def test_llama_cuda_and_per_env_options_from_file_and_environment(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('llama_cuda = "off"\n[envs.exllamav2]\nsystem_site_packages = true\n')
    settings = load_settings(config)
    assert settings.llama_cuda == "off" and settings.envs["exllamav2"].system_site_packages is True
    monkeypatch.setenv("NODESUP_ENVS__EXL2__SYSTEM_SITE_PACKAGES", "true")
    assert load_settings(None).envs["exl2"].system_site_packages is True
    assert load_settings(None).llama_cuda == "auto"
    config.write_text('llama_cuda = "yes"\n')
    with pytest.raises(ConfigError, match="llama_cuda"):
        load_settings(config)
    config.write_text("[envs.exllamav2]\nsystem_site = true\n")
    with pytest.raises(ConfigError, match=r"envs\.exllamav2\.system_site"):
        load_settings(config)
