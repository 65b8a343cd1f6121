"""llama.cpp's own ``llama-server``, built from the llama.cpp that the installed llama-cpp-python vendors,
against that environment's own installed ggml.

    .venv/bin/python bench/llama_server_build.py [--gpu]      (make bench does this first)

The comparison with llama-server is only fair when both run the same
llama.cpp compiled the same way.  So this takes the sdist of exactly the
llama-cpp-python version installed in the llama.cpp environment (PyPI ships
it with ``vendor/llama.cpp``; pip's own options find it, PIP_FIND_LINKS and
PIP_NO_INDEX included, or ``pip_args``), and configures that tree with what
the environment's own build used:

* ggml is not compiled again: llama-cpp-python's wheel installs ggml's
  libraries, headers and CMake package (``<site-packages>/lib/cmake/ggml``),
  and the tree is configured with ``-DLLAMA_USE_SYSTEM_GGML=ON
  -Dggml_DIR=<that folder>``, so only libllama, common and the server are
  built, and llama-server runs the environment's very ggml (CUDA included:
  no nvcc is needed here, the backends are already compiled);
* what llama-cpp-python's CMakeLists.txt and scikit-build-core set
  (``LLAMA_CPP_PYTHON_FLAGS``): a Release build of shared libraries, no curl;
* the environment's recorded ``CMAKE_ARGS`` (its marker) less those for ggml
  and CUDA, which shape only the ggml already built, and CFLAGS/CXXFLAGS as
  supervisor/node/builds.py sets them (the AMX kernels left out on x86-64);
* and, for the build only, switches that change no code in llama-server's
  path: no tests or examples, no web UI (it would be downloaded).

Only the ``llama-server`` target is built.  The binary and the libraries
built with it are kept in ``<state>/bench/llama-server-<version>-<cpu|cuda>-ggml<digest>/``
with ``build.json`` (the version, every flag, the CPU, the digest of the
installed ggml: its libraries, headers and CMake package), and reused while
those match; the binary finds ggml in the environment (its RPATH), so an
environment built again, with another ggml, gets a build of its own.
``build_llama_server`` is the reusable part: the binary for an environment,
whatever runs it (the comparison, the GPU check, llama-server's router mode).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.node.builds import BuildChoice, cpu_digest, environ_for, pinned_requirement  # noqa: E402
from supervisor.config import Settings  # noqa: E402
from supervisor.node.envs import env_dir, env_python, read_marker, requirements_file  # noqa: E402

LineFn = Callable[[str], None]
DIST = "llama-cpp-python"
# What llama-cpp-python's CMakeLists.txt forces (BUILD_SHARED_LIBS, LLAMA_CURL,
# LLAMA_BUILD_COMMON) and scikit-build-core's default build type.
LLAMA_CPP_PYTHON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
)
# The environment's CMAKE_ARGS that shape only ggml (or its CUDA code), already built and installed there.
GGML_ONLY_ARGS = ("-DGGML_", "-DCMAKE_CUDA_", "-DCMAKE_HIP_")
# Build-only switches: nothing here is compiled into llama-server's token path.
BUILD_ONLY_FLAGS = (
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",  # the binary finds its libraries beside it once copied
)
# The installed libggml-cuda needs the CUDA runtime libraries (cudart, cuBLAS): the binary finds them at run
# time as the worker does (the system's library paths); the link does not have to see them.
CUDA_LINK_FLAGS = ("-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined",)
RECORDED_CACHE_ENTRIES = (
    "LLAMA_USE_SYSTEM_GGML",
    "ggml_DIR",
    "CMAKE_BUILD_TYPE",
    "CMAKE_C_COMPILER",
    "CMAKE_CXX_COMPILER",
)


class ServerBuildError(Exception):
    """llama-server cannot be built or used for this comparison; the message says why and what to do."""


def installed_llama(settings: Settings, env_name: str = "llamacpp") -> dict[str, Any]:
    """The llama-cpp-python version in the environment and how it was built (its marker's record)."""
    path = env_dir(settings, env_name)
    marker = read_marker(path)
    if marker is None:
        raise ServerBuildError(
            f"no finished llama.cpp environment at {path}: run `node-supervisor envs create {env_name}`"
        )
    found = subprocess.run(
        [str(env_python(path)), "-c", f"from importlib.metadata import version; print(version({DIST!r}))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if found.returncode != 0:
        raise ServerBuildError(f"{DIST} is not installed in {path}: {found.stderr.strip()[-300:]}")
    return {
        "version": found.stdout.strip(),
        "build": marker.get("build") or {"cuda": False, "cmake_args": ""},
        "env": path,
    }


def ggml_package(env: Path) -> Path:
    """ggml's CMake package that llama-cpp-python's wheel installed in the environment (``lib/cmake/ggml``)."""
    found = sorted(env.glob("lib/python3*/site-packages/lib/cmake/ggml")) + sorted(
        env.glob("Lib/site-packages/lib/cmake/ggml")
    )
    if not found or not (found[0] / "ggml-config.cmake").is_file():
        raise ServerBuildError(
            f"{env} holds no ggml CMake package (site-packages/lib/cmake/ggml/ggml-config.cmake): "
            f"its {DIST} wheel did not install ggml; run `node-supervisor envs create llamacpp` again"
        )
    return found[0]


def ggml_digest(package: Path) -> str:
    """A digest of the installed ggml: its CMake package, headers and libraries (the files, not their links)."""
    site = package.parent.parent.parent
    files = [
        *sorted(package.glob("*.cmake")),
        *sorted((site / "include").glob("ggml*.h")),
        *sorted((site / "include").glob("gguf*.h")),
        *sorted(f for f in (site / "lib").glob("*ggml*") if f.is_file() and not f.is_symlink()),
    ]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def pinned_version() -> str:
    """The llama-cpp-python version the llama.cpp environment's requirements pin (known before it is made)."""
    pinned = pinned_requirement(requirements_file("llamacpp"), DIST)
    if pinned is None:
        raise ServerBuildError(f"{requirements_file('llamacpp')} pins no {DIST} version")
    return pinned.split("==", 1)[1]


def build_settings(build: dict[str, Any], ggml: Path, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The configure and compiler flags that reproduce the environment's build of llama.cpp on its installed ggml."""
    choice = BuildChoice(bool(build.get("cuda")), build.get("cmake_args") or "", "as the environment was built")
    full = environ_for(choice, environ)
    kept = [arg for arg in shlex.split(choice.cmake_args) if not arg.upper().startswith(GGML_ONLY_ARGS)]
    return {
        "cuda": choice.cuda,
        "cmake_flags": [
            *LLAMA_CPP_PYTHON_FLAGS,
            *kept,
            "-DLLAMA_USE_SYSTEM_GGML=ON",
            f"-Dggml_DIR={ggml}",
            *BUILD_ONLY_FLAGS,
            *(CUDA_LINK_FLAGS if choice.cuda and sys.platform.startswith("linux") else ()),
        ],
        "CFLAGS": full.get("CFLAGS", ""),
        "CXXFLAGS": full.get("CXXFLAGS", ""),
        "cpu": cpu_digest(),
        "ggml": ggml_digest(ggml) if ggml.is_dir() else "",
    }


def server_dir(settings: Settings, version: str, cuda: bool, ggml: str) -> Path:
    return settings.state_dir / "bench" / f"llama-server-{version}-{'cuda' if cuda else 'cpu'}-ggml{ggml[:8]}"


def reuse_reason(directory: Path, version: str, wanted: dict[str, Any]) -> str | None:
    """None when the kept binary was built from ``version`` with ``wanted``; else why it must be built."""
    record_path = directory / "build.json"
    if not (directory / "bin" / "llama-server").is_file() or not record_path.is_file():
        return "not built yet"
    try:
        recorded = json.loads(record_path.read_text())
    except ValueError:
        return "its build.json is unreadable"
    if recorded.get("version") != version:
        return f"built from {recorded.get('version')}, not {version}"
    changed = [key for key, value in wanted.items() if recorded.get(key) != value]
    return f"built with other {', '.join(changed)}" if changed else None


def ensure_llama_server(settings: Settings, gpu: bool, on_line: LineFn) -> tuple[Path, dict[str, Any]]:
    """The llama-server binary for this comparison (built now if missing or built otherwise), and its record."""
    installed = installed_llama(settings)
    if gpu and not installed["build"].get("cuda"):
        raise ServerBuildError(
            f"--gpu needs a CUDA build of llama-cpp-python, and {installed['env']} is CPU-only "
            f"({installed['build'].get('reason', 'no reason recorded')}): on a node with an NVIDIA driver and nvcc, "
            'set llama_cuda = "on" (or CMAKE_ARGS="-DGGML_CUDA=on") and run `node-supervisor envs create llamacpp`'
        )
    if not gpu and installed["build"].get("cuda"):
        raise ServerBuildError(
            f"{installed['env']} is a CUDA build: run with --gpu (the CPU comparison needs a CPU-only build)"
        )
    return build_llama_server(settings, installed, on_line)


def build_llama_server(settings: Settings, installed: dict[str, Any], on_line: LineFn) -> tuple[Path, dict[str, Any]]:
    """llama-server for the environment ``installed`` describes (``installed_llama``), on its own ggml:
    the kept binary while its version, flags and ggml match, else built now; and its record (build.json)."""
    wanted = build_settings(installed["build"], ggml_package(installed["env"]))
    directory = server_dir(settings, installed["version"], wanted["cuda"], wanted["ggml"])
    reason = reuse_reason(directory, installed["version"], wanted)
    if reason is not None:
        on_line(f"building llama-server {installed['version']} ({reason}) in {directory}: minutes, once")
        _build(settings, directory, installed["version"], wanted, on_line)
    record = json.loads((directory / "build.json").read_text())
    return directory / "bin" / "llama-server", record


def _build(settings: Settings, directory: Path, version: str, wanted: dict[str, Any], on_line: LineFn) -> None:
    if shutil.which("cmake") is None:
        raise ServerBuildError(
            "cmake is not on PATH: it is needed to build llama-server (as it was for llama-cpp-python)"
        )
    work = directory.with_name(directory.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = vendored_source(settings, version, work, on_line)
    build = work / "build"
    environ = {**os.environ, **{k: wanted[k] for k in ("CFLAGS", "CXXFLAGS") if wanted[k]}}
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    started = time.monotonic()
    _run(
        ["cmake", "-S", str(source), "-B", str(build), *generator, *wanted["cmake_flags"]],
        environ,
        on_line,
        "configuring",
    )
    jobs = str(os.cpu_count() or 1)
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], environ, on_line, "building")
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "bin").mkdir(parents=True)
    for item in (build / "bin").iterdir():
        if item.name == "llama-server" or ".so" in item.name or item.suffix == ".dll":
            shutil.copy2(item, directory / "bin" / item.name, follow_symlinks=False)
    record = {
        "version": version,
        **wanted,
        "cmake_cache": _cache_entries(build / "CMakeCache.txt"),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.monotonic() - started),
    }
    (directory / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    on_line(f"llama-server built in {record['build_seconds']} s: {directory / 'bin' / 'llama-server'}")


def vendored_source(settings: Settings, version: str, work: Path, on_line: LineFn) -> Path:
    """vendor/llama.cpp from the sdist of ``version`` (fetched once into <state>/bench/sdist), extracted in ``work``."""
    sdists = settings.state_dir / "bench" / "sdist"
    archive = sdists / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        sdists.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,  # any pip will do: the environment may not exist yet (bench/gpu_check.py)
            "-m",
            "pip",
            "download",
            f"{DIST}=={version}",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(sdists),
        ]
        _run([*command, *settings.pip_args], dict(os.environ), on_line, "downloading the sdist")
    if not archive.is_file():
        raise ServerBuildError(f"pip did not leave {archive.name} in {sdists}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise ServerBuildError(f"{archive.name} holds no vendor/llama.cpp")
        tar.extractall(work / "sdist", members=members, filter="data")
    return work / "sdist" / prefix


def _run(command: list[str], environ: dict[str, str], on_line: LineFn, what: str) -> None:
    on_line(f"{what}: {shlex.join(command)}")
    process = subprocess.Popen(
        command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert process.stdout is not None
    tail: list[str] = []
    for line in process.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        if line.startswith(("[", "--", "CMake", "ninja")) or "error" in line.lower():
            on_line(line.rstrip())
    if process.wait() != 0:
        raise ServerBuildError(f"{what} failed (exit code {process.returncode}):\n" + "\n".join(tail))


def _cache_entries(cache: Path) -> dict[str, str]:
    """What CMake settled on for the flags that shape the code (the defaults included)."""
    entries = {}
    for line in cache.read_text(errors="replace").splitlines():
        name, _, value = line.partition("=")
        key = name.split(":", 1)[0]
        if key in RECORDED_CACHE_ENTRIES:
            entries[key] = value
    return entries


def main() -> int:
    from tests.conftest import shared_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the CUDA build (the environment must be a CUDA build)")
    parser.add_argument(
        "--source",
        type=Path,
        help="only extract the pinned llama-cpp-python's vendored llama.cpp into DIR (DIR/llama.cpp links to it)",
    )
    args = parser.parse_args()
    try:
        if args.source is not None:
            settings = shared_settings()
            source = vendored_source(settings, pinned_version(), args.source, print)
            link = args.source / "llama.cpp"
            link.unlink(missing_ok=True)
            link.symlink_to(source.resolve(), target_is_directory=True)
            print(link)
            return 0
        binary, record = ensure_llama_server(shared_settings(), args.gpu, lambda line: print(line, flush=True))
    except ServerBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{binary}\n{json.dumps(record, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
