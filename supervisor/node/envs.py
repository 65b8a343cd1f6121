"""Per-engine virtual environments, and the worker code they run.

Each engine kind gets its own environment under ``envs_dir``, built from the
pinned ``config/requirements/<kind>.txt``, so the engines' NumPy / PyTorch
stacks never meet each other or the daemon.  An environment counts as
present only once a marker file records the requirements it was built from:
an interrupted build, or changed requirements, is built again.  The marker
also records how a compiled library was built (CUDA or CPU, CMAKE_ARGS, the
CPU), so staleness follows the node, not the shell that asks.

On a GPU node an environment may see the node's own site-packages
(``[envs.<name>] system_site_packages``) to use its CUDA torch; every pinned
requirement is still installed into the environment, which comes first on
sys.path, so its NumPy stack stays its own.

The worker code (the ``workers`` package, standard library + pyzmq) is copied
into ``<state_dir>/runtime/<digest>/`` and put on the worker's PYTHONPATH, so
the environment imports it without any of the daemon's own packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any, Callable

import workers

from .builds import SOURCE_BUILT, BuildChoice, BuildError, build_choice, build_key, build_stale_reason, build_wheel
from .builds import environ_for, find_nvcc, pinned_requirement, requirements_without
from ..config import EnvConfig, Settings

REQUIREMENTS_DIR = Path(__file__).resolve().parents[2] / "config" / "requirements"
MARKER = "node-supervisor-env.json"

# Run in a new environment after pip.  exllamav2 compiles its CUDA extension
# the first time it is imported, which takes minutes: done here, on a node
# with CUDA, it does not happen inside a worker's start-up, where it would
# look like a hang.  Without CUDA there is nothing to compile.
POST_INSTALL = {
    "exllamav2": "import torch\nif torch.cuda.is_available():\n    import exllamav2\n    print('exllamav2 CUDA extension built')",
}
LineFn = Callable[[str], None]


class EnvError(Exception):
    """An environment could not be created or used; the message says what to do."""


def requirements_file(kind: str) -> Path:
    path = REQUIREMENTS_DIR / f"{kind}.txt"
    if not path.is_file():
        raise EnvError(f"no requirements for engine kind {kind!r} ({path} is missing)")
    return path


def env_dir(settings: Settings, name: str) -> Path:
    return settings.envs_dir / name


def env_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def env_is_current(settings: Settings, name: str, kind: str) -> bool:
    return stale_reason(settings, name, kind) is None


def stale_reason(settings: Settings, name: str, kind: str) -> str | None:
    """Why environment ``name`` must be built again, or None when it is current.

    Judged against the requirements, the configuration and this node, never
    against the caller's shell: a daemon under systemd (no CMAKE_ARGS) keeps
    a CUDA build that the node calls for.
    """
    recorded = read_marker(env_dir(settings, name))
    if recorded is None:
        return "missing, or its last build did not finish"
    if recorded.get("requirements_sha") != _digest(requirements_file(kind).read_text()):
        return f"{kind}.txt changed since it was built"
    if bool(recorded.get("system_site_packages")) != env_options(settings, name).system_site_packages:
        return "system_site_packages changed in the configuration"
    requirement = _source_build(kind)
    return None if requirement is None else build_stale_reason(settings, requirement, recorded)


def read_marker(path: Path) -> dict[str, Any] | None:
    """The environment's record of its build; None while it is missing or unfinished."""
    marker = path / MARKER
    if not marker.is_file() or not env_python(path).exists():
        return None
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return None
    return recorded if isinstance(recorded, dict) else None


def env_options(settings: Settings, name: str) -> EnvConfig:
    return settings.envs.get(name) or EnvConfig()


def _source_build(kind: str) -> str | None:
    """The pinned requirement of ``kind`` that is compiled from source, if any."""
    dist = SOURCE_BUILT.get(kind)
    return pinned_requirement(requirements_file(kind), dist) if dist else None


def create_env(settings: Settings, name: str, kind: str, on_line: LineFn) -> Path:
    """Create (or bring up to date) environment ``name`` for engine ``kind``, streaming pip's output."""
    requirements = requirements_file(kind)
    path = env_dir(settings, name)
    marker = path / MARKER
    marker.unlink(missing_ok=True)  # not current until pip has finished
    system_site = env_options(settings, name).system_site_packages
    _ensure_venv(path, system_site, on_line)
    choice, prebuilt = _prebuilt(settings, path, kind, on_line)
    reused = node_packages(path, REUSED_FROM_NODE, on_line) if system_site else {}
    install_from = requirements_without(requirements, set(reused), path) if reused else requirements
    on_line(f"installing {requirements.name} into {path}")
    if system_site:  # the pinned lines go into the env even where the node has them: its own NumPy comes first
        _pip(
            settings, path, ["install", "--ignore-installed", "--no-deps", *prebuilt, "-r", str(install_from)], on_line
        )
    _pip(settings, path, ["install", *prebuilt, "-r", str(install_from)], on_line)
    if kind in POST_INSTALL:
        on_line(f"preparing {kind} (first import)")
        code = run_streaming([str(env_python(path)), "-c", POST_INSTALL[kind]], on_line)
        if code != 0:
            raise EnvError(f"the first import of {kind} failed (exit code {code}) in {path}")
    marker.write_text(
        json.dumps(
            {
                "kind": kind,
                "requirements_sha": _digest(requirements.read_text()),
                "build_key": _recorded_key(kind, choice),
                "build": choice.record() if choice else None,
                "system_site_packages": system_site,
                "reused": reused,
            }
        )
    )
    return path


def _recorded_key(kind: str, choice: BuildChoice | None) -> str | None:
    requirement = _source_build(kind)
    return build_key(requirement, environ_for(choice)) if requirement and choice else None


def _prebuilt(settings: Settings, path: Path, kind: str, on_line: LineFn) -> tuple[BuildChoice | None, list[str]]:
    """The compiled library's wheel, built for this node (or the caller's CMAKE_ARGS)."""
    requirement = _source_build(kind)
    if requirement is None:
        return None, []
    choice = build_choice(settings)
    on_line(f"llama.cpp build: {'CUDA' if choice.cuda else 'CPU-only'} ({choice.reason})")
    if choice.cuda and not choice.explicit and find_nvcc() is None:  # say so now, not after a CMake error
        raise EnvError('llama_cuda = "on" but no nvcc (PATH, CUDA_HOME, /usr/local/cuda/bin): install the CUDA toolkit')
    try:
        wheel = build_wheel(
            env_python(path), requirement, settings.pip_args, on_line, run_streaming, environ_for(choice)
        )
    except BuildError as exc:
        raise EnvError(str(exc)) from None
    return choice, [str(wheel)]


def _pip(settings: Settings, path: Path, args: list[str], on_line: LineFn) -> None:
    """Every pip call of an environment build, with the configured ``pip_args`` (index, offline wheel folder)."""
    command = [str(env_python(path)), "-m", "pip", *args[:1], "--progress-bar", "off", *args[1:], *settings.pip_args]
    code = run_streaming(command, on_line, env={**os.environ, "PYTHONNOUSERSITE": "1"})  # what a worker sees, no more
    if code != 0:
        raise EnvError(f"pip failed with exit code {code} ({' '.join(args[:1] + args[-2:])}) in {path}")


def _ensure_venv(path: Path, system_site: bool, on_line: LineFn) -> None:
    """The virtual environment, made again when it sees the node's packages and should not, or the reverse."""
    if env_python(path).exists() and venv_sees_node_packages(path) == system_site:
        return
    on_line(f"creating virtual environment {path}" + (" (with the node's site-packages)" if system_site else ""))
    venv.EnvBuilder(with_pip=True, clear=True, system_site_packages=system_site).create(path)


# Packages a GPU node may already have, large and built for its CUDA: an environment
# with ``system_site_packages`` uses the node's copy instead of installing its own.
REUSED_FROM_NODE = ("torch",)
_WHERE = "import sys; from importlib import metadata; d = metadata.distribution(sys.argv[1]); print(d.version); print(d.locate_file(''))"


def node_packages(path: Path, names: tuple[str, ...], on_line: LineFn) -> dict[str, str]:
    """Which of ``names`` the environment sees from the node's own site-packages (name -> version)."""
    reused = {}
    for name in names:
        found = subprocess.run(
            [str(env_python(path)), "-I", "-c", _WHERE, name], capture_output=True, text=True, timeout=120
        )
        version, _, where = found.stdout.strip().partition("\n")
        if found.returncode == 0 and not Path(where).resolve().is_relative_to(path.resolve()):
            reused[name] = version
        on_line(
            f"{name}: the node's {version}, not installed again"
            if name in reused
            else f"{name}: not among the node's packages"
        )
    return reused


def venv_sees_node_packages(path: Path) -> bool:
    """pyvenv.cfg's word: does this environment see the base interpreter's site-packages."""
    cfg = path / "pyvenv.cfg"
    text = cfg.read_text() if cfg.is_file() else ""
    return bool(re.search(r"^include-system-site-packages\s*=\s*true\s*$", text, re.MULTILINE | re.IGNORECASE))


def run_streaming(command: list[str], on_line: LineFn, env: dict[str, str] | None = None) -> int:
    """Run a command, passing each line of its combined output to ``on_line``."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_line(line.rstrip())
        return proc.wait()


def worker_code_dir(settings: Settings) -> Path:
    """A directory holding only the ``workers`` package, named by its content digest.

    A worker started from an older copy keeps running its own code; a new
    copy appears only when the code changes.
    """
    source = Path(workers.__file__).resolve().parent
    files = sorted(f.relative_to(source) for f in source.rglob("*.py"))  # subpackages too (workers/protocol/)
    digest = _digest("".join(str(f) + (source / f).read_text(encoding="utf-8") for f in files))
    target = settings.state_dir / "runtime" / digest
    if not (target / "workers" / "__init__.py").is_file():
        staging = target.with_name(f"{digest}.tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        for f in files:
            (staging / "workers" / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / f, staging / "workers" / f)
        try:
            staging.rename(target)
        except OSError:  # another process won the race with identical content
            shutil.rmtree(staging, ignore_errors=True)
    return target


def worker_environ(settings: Settings) -> dict[str, str]:
    """Environment variables for a worker: only its own packages and the worker code."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    environ["PYTHONPATH"] = str(worker_code_dir(settings))
    environ["PYTHONUNBUFFERED"] = "1"  # worker lines reach the daemon's log as they are written
    environ["PYTHONNOUSERSITE"] = "1"
    return environ


_PROBE = """
import importlib.util, json, sys
from workers.runtime import installed_versions
facts = {"python": sys.version.split()[0], "executable": sys.executable, "packages": installed_versions()}
facts["numpy_file"] = getattr(importlib.util.find_spec("numpy"), "origin", None)
if facts["packages"].get("torch"):
    try:
        import torch
        facts["cuda_available"] = torch.cuda.is_available()
    except Exception:
        facts["cuda_available"] = False
try:
    from workers.engine import load_engine
    facts["engine"] = load_engine(sys.argv[1]).versions()
except Exception as exc:
    facts["unavailable"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(facts))
"""


def check_env(settings: Settings, name: str, kind: str) -> dict[str, Any]:
    """Ask the environment's own interpreter what it has: libraries, NumPy, GPU support."""
    path = env_dir(settings, name)
    python = env_python(path)
    if not python.exists():
        raise EnvError(f"environment {name!r} does not exist; run: node-supervisor envs create {name}")
    result = subprocess.run(
        [str(python), "-c", _PROBE, kind], capture_output=True, text=True, env=worker_environ(settings), timeout=120
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise EnvError(
            f"environment {name!r} is broken: {result.stderr.strip().splitlines()[-1:] or result.returncode}"
        )
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    stale, recorded = stale_reason(settings, name, kind), read_marker(path) or {}
    facts.update(
        env=name, current=stale is None, stale=stale, build=recorded.get("build"), reused=recorded.get("reused") or {}
    )
    # With system_site_packages the node's NumPy is on sys.path too: the env's own must come first.
    facts["numpy_own"] = bool(facts["numpy_file"]) and Path(facts["numpy_file"]).resolve().is_relative_to(
        path.resolve()
    )
    return facts
