"""Engine libraries compiled from source, built once per build configuration.

llama-cpp-python ships as source only; pip compiles llama.cpp for the machine
it runs on (``-march=native``).  Two things go wrong with pip's own wheel
cache, which remembers a wheel by package version alone:

* a rebuild asked for with other options (``CMAKE_ARGS="-DGGML_CUDA=on"``)
  silently reinstalls the cached CPU-only wheel;
* a state directory or cache carried to another CPU gets a wheel built for
  the first one (illegal instructions, or kernels that crash).

So the wheel is built here, with ``pip wheel --no-cache-dir``, into a cache
directory named by a digest of everything that shapes the binary: the
package version, CMAKE_ARGS / CFLAGS / CXXFLAGS, the interpreter, the machine
and, for a native build, the CPU's feature flags.  The same configuration on
the same machine reuses the wheel; anything else builds a new one.

On x86-64 the build leaves out llama.cpp's AMX kernels: on AMX machines
(Sapphire Rapids and later) they crash in the first decode of a Q4_K model
(ggml-org/llama.cpp#20824); the AVX-512 kernels serve instead.

Which build a node needs (CUDA or CPU) is a function of the node and the
configuration, never of the shell that happens to start the daemon: a daemon
under systemd has no ``CMAKE_ARGS`` and must still count a CUDA build as
current.  ``CMAKE_ARGS`` given by the caller of ``envs create`` wins and is
recorded as an explicit choice.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from ..config import Settings
from ..planning.measure.gpu import probe

# engine kind -> the requirement compiled from source, read from its requirements file
SOURCE_BUILT = {"llamacpp": "llama-cpp-python"}
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD_VARIABLES = ("CMAKE_ARGS", "CFLAGS", "CXXFLAGS")
CUDA_ON = re.compile(r"-DGGML_CUDA(?::BOOL)?=(ON|1|TRUE|YES)\b", re.IGNORECASE)

LineFn = Callable[[str], None]


def wheel_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "node-supervisor" / "wheels"


def pinned_requirement(requirements: Path, dist: str) -> str | None:
    """The ``dist==version`` line of a requirements file, if it pins ``dist``."""
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if re.match(rf"^{re.escape(dist)}\s*==", line, re.IGNORECASE):
            return line.replace(" ", "")
    return None


def requirements_without(requirements: Path, names: set[str], directory: Path) -> Path:
    """A copy of a requirements file without the lines for ``names`` (packages the node provides)."""
    wanted = {_canonical(n) for n in names}
    kept = [
        line
        for line in requirements.read_text().splitlines()
        if _canonical(re.split(r"[\s<>=!~;\[@]", line.split("#", 1)[0].strip(), maxsplit=1)[0]) not in wanted
    ]
    target = directory / f"{requirements.stem}-without-node-packages.txt"
    target.write_text("\n".join(kept) + "\n")
    return target


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def build_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the source build runs in: the caller's, plus the flags this project adds."""
    environ = dict(os.environ if base is None else base)
    if _x86_64() and sys.platform != "win32":
        # CFLAGS/CXXFLAGS seed CMake's compiler flags; an explicit -mno-* wins
        # over what -march=native turns on, whatever the order.
        for var in ("CFLAGS", "CXXFLAGS"):
            environ[var] = f"{environ.get(var, '')} {NO_AMX}".strip()
    return environ


def build_key(requirement: str, environ: dict[str, str]) -> str:
    facts = {
        "requirement": requirement,
        "build": {var: environ.get(var, "") for var in BUILD_VARIABLES},
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "machine": platform.machine(),
        "cpu_flags": _cpu_flags(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _wheel_in(directory: Path) -> Path | None:
    wheels = sorted(directory.glob("*.whl")) if directory.is_dir() else []
    return wheels[0] if wheels else None


def build_wheel(
    python: Path,
    requirement: str,
    pip_args: list[str],
    on_line: LineFn,
    run: Callable[..., int],
    environ: dict[str, str] | None = None,
) -> Path:
    """The wheel for ``requirement`` in this build configuration: from the cache, or built now.

    ``environ`` is the build's whole environment (``environ_for(choice)``); its build
    variables name the cache entry, so a CUDA build never reuses a CPU wheel.
    """
    environ = build_environ() if environ is None else environ
    target = wheel_cache_root() / build_key(requirement, environ)
    wheel = _wheel_in(target)
    if wheel is not None:
        on_line(f"using {wheel.name} built earlier for this machine and build options ({target})")
        return wheel
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    on_line(
        f"compiling {requirement} with CMAKE_ARGS={environ.get('CMAKE_ARGS', '')!r} (minutes; once per machine and build options)"
    )
    command = [
        str(python),
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-cache-dir",
        "--progress-bar",
        "off",
        "-w",
        str(staging),
        requirement,
        *pip_args,
    ]
    code = run(command, on_line, env=environ)
    wheels = sorted(staging.glob("*.whl"))
    if code != 0 or not wheels:
        shutil.rmtree(staging, ignore_errors=True)
        raise BuildError(f"building {requirement} failed (pip exit code {code}); its output is above")
    try:
        staging.rename(target)
    except OSError:  # another build of the same configuration finished first
        shutil.rmtree(staging, ignore_errors=True)
    wheel = _wheel_in(target)
    assert wheel is not None
    return wheel


class BuildError(Exception):
    pass


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _cpu_flags() -> str:
    """The CPU's feature flags: a native build is only good for CPUs that have them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return " ".join(sorted(match.group(1).split())) if match else platform.processor()


def cpu_digest() -> str:
    """Recorded with a build: a native build is only good for CPUs with the same features."""
    return hashlib.sha256(_cpu_flags().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class NodeFacts:
    """What decides a CUDA build: a driver to run it, nvcc to compile it, the GPUs' architectures."""

    driver: str | None  # how the driver was found; None: absent
    nvcc: str | None  # path of nvcc; None: absent
    compute_caps: tuple[str, ...] = ()  # "89" per distinct GPU architecture
    no_driver: str = ""  # why no driver was found


@dataclass(frozen=True)
class BuildChoice:
    cuda: bool
    cmake_args: str
    reason: str
    explicit: bool = False  # CMAKE_ARGS given by the caller: kept until the caller builds again

    def record(self) -> dict[str, Any]:
        """What the environment's marker keeps of the build (and the CPU it was built on)."""
        return {
            "cuda": self.cuda,
            "cmake_args": self.cmake_args,
            "explicit": self.explicit,
            "reason": self.reason,
            "cpu": cpu_digest(),
        }


def find_nvcc() -> str | None:
    """nvcc on PATH, under CUDA_HOME / CUDA_PATH, or in /usr/local/cuda: systemd's PATH often lacks it."""
    exe = "nvcc.exe" if sys.platform == "win32" else "nvcc"
    if found := shutil.which(exe):
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return next((str(Path(h) / "bin" / exe) for h in homes if h and (Path(h) / "bin" / exe).is_file()), None)


def _compute_caps() -> tuple[str, ...]:
    """The GPUs' compute capabilities ("8.9" -> "89"): a build for those alone is faster and needs no
    GPU at build time (CMake's default "native" does).  Empty when nvidia-smi cannot tell."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    caps = {line.strip().replace(".", "") for line in out.splitlines()}
    return tuple(sorted(c for c in caps if c.isdigit()))


@lru_cache(maxsize=1)
def node_facts() -> NodeFacts:
    """Probed once per process: the hardware does not change under a running daemon."""
    snapshot = probe()
    if snapshot.devices:
        driver: str | None = f"NVIDIA driver {snapshot.driver_version or '?'} ({len(snapshot.devices)} GPU)"
    elif Path("/proc/driver/nvidia/version").is_file():
        driver = "NVIDIA driver (/proc/driver/nvidia/version)"
    else:
        driver = None
    return NodeFacts(driver, find_nvcc(), _compute_caps() if driver else (), "" if driver else snapshot.reason)


def desired_build(settings: Settings, node: NodeFacts | None = None) -> BuildChoice:
    """The llama.cpp build this node and configuration call for, whoever asks."""
    if settings.llama_cuda == "off":
        return BuildChoice(False, "", 'llama_cuda = "off"')
    node = node_facts() if node is None else node
    if settings.llama_cuda == "on":
        return BuildChoice(True, cuda_cmake_args(node), 'llama_cuda = "on"')
    if node.driver is None:
        return BuildChoice(False, "", f"auto: {node.no_driver or 'no NVIDIA driver'}")
    if node.nvcc is None:
        return BuildChoice(
            False,
            "",
            f"auto: {node.driver} but no nvcc (PATH, CUDA_HOME, /usr/local/cuda/bin); install the CUDA toolkit",
        )
    return BuildChoice(True, cuda_cmake_args(node), f"auto: {node.driver} and nvcc ({node.nvcc})")


def cuda_cmake_args(node: NodeFacts) -> str:
    arch = f" -DCMAKE_CUDA_ARCHITECTURES={';'.join(node.compute_caps)}" if node.compute_caps else ""
    return f"-DGGML_CUDA=on{arch}"


def build_choice(settings: Settings, environ: dict[str, str] | None = None) -> BuildChoice:
    """What ``envs create`` builds: the caller's own CMAKE_ARGS if given, else the desired build."""
    given = (os.environ if environ is None else environ).get("CMAKE_ARGS", "").strip()
    if given:
        return BuildChoice(bool(CUDA_ON.search(given)), given, "CMAKE_ARGS given by the caller", explicit=True)
    return desired_build(settings)


def environ_for(choice: BuildChoice, base: dict[str, str] | None = None) -> dict[str, str]:
    """The build's environment for ``choice``; CUDACXX points CMake at nvcc when PATH does not."""
    environ = {**(os.environ if base is None else base), "CMAKE_ARGS": choice.cmake_args}
    if choice.cuda and "CUDACXX" not in environ and (nvcc := find_nvcc()):
        environ["CUDACXX"] = nvcc
    return build_environ(environ)


def build_stale_reason(settings: Settings, requirement: str, recorded: dict[str, Any]) -> str | None:
    """Why an environment's compiled library must be built again (its marker: ``recorded``), or None.

    Stale on another CPU, or when its CUDA choice is not the one the node calls for;
    an explicit CMAKE_ARGS build stands until its caller builds again.
    """
    build = recorded.get("build")
    if build is None:  # recorded before build options were: its key, under what may have made it
        return _legacy_stale_reason(settings, requirement, recorded.get("build_key"))
    if build.get("cpu") != cpu_digest():
        return "built on a CPU with other features"
    if build.get("explicit"):
        return None  # the caller's own CMAKE_ARGS stand until the caller builds again
    desired = desired_build(settings)
    if bool(build.get("cuda")) == desired.cuda:
        return None
    have, want = ("CUDA", "CPU-only") if build.get("cuda") else ("CPU-only", "CUDA")
    return f"a {have} build, and the node calls for a {want} one ({desired.reason})"


def _legacy_stale_reason(settings: Settings, requirement: str, key: str | None) -> str | None:
    """A marker with only a build key: current if it is the key of the desired build (or of the
    documented CUDA command on a CUDA node, or of the caller's own CMAKE_ARGS)."""
    desired = desired_build(settings)
    candidates = [
        desired.cmake_args,
        "-DGGML_CUDA=on" if desired.cuda else "",
        os.environ.get("CMAKE_ARGS", "").strip(),
    ]
    accepted = {
        build_key(requirement, build_environ({**os.environ, "CMAKE_ARGS": args}))
        for args in candidates
        if args or not desired.cuda
    }
    return (
        None
        if key in accepted
        else f"built with other options or on another CPU than the node calls for ({desired.reason})"
    )
