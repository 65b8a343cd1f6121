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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

# engine kind -> the requirement compiled from source, read from its requirements file
SOURCE_BUILT = {"llamacpp": "llama-cpp-python"}
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD_VARIABLES = ("CMAKE_ARGS", "CFLAGS", "CXXFLAGS")

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


def build_wheel(python: Path, requirement: str, pip_args: list[str], on_line: LineFn, run: Callable[..., int]) -> Path:
    """The wheel for ``requirement`` in this build configuration: from the cache, or built now."""
    environ = build_environ()
    target = wheel_cache_root() / build_key(requirement, environ)
    wheel = _wheel_in(target)
    if wheel is not None:
        on_line(f"using {wheel.name} built earlier for this machine and build options ({target})")
        return wheel
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    on_line(f"compiling {requirement} (minutes; once per machine and build options)")
    command = [str(python), "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--progress-bar", "off", "-w", str(staging), requirement, *pip_args]
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
