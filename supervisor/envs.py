"""Per-engine virtual environments, and the worker code they run.

Each engine kind gets its own environment under ``envs_dir``, built from the
pinned ``config/requirements/<kind>.txt``, so the engines' NumPy / PyTorch
stacks never meet each other or the daemon.  An environment counts as
present only once a marker file records the requirements it was built from:
an interrupted build, or changed requirements, is built again.

The worker code (the ``workers`` package, standard library + pyzmq) is copied
into ``<state_dir>/runtime/<digest>/`` and put on the worker's PYTHONPATH, so
the environment imports it without any of the daemon's own packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any, Callable

import workers

from .builds import SOURCE_BUILT, BuildError, build_environ, build_key, build_wheel, pinned_requirement
from .config import Settings

REQUIREMENTS_DIR = Path(__file__).resolve().parent.parent / "config" / "requirements"
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
    marker = env_dir(settings, name) / MARKER
    if not marker.is_file() or not env_python(env_dir(settings, name)).exists():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return False
    return recorded.get("requirements_sha") == _digest(requirements_file(kind).read_text()) and recorded.get(
        "build_key"
    ) == _source_build_key(kind)


def _source_build(kind: str) -> str | None:
    """The pinned requirement of ``kind`` that is compiled from source, if any."""
    dist = SOURCE_BUILT.get(kind)
    return pinned_requirement(requirements_file(kind), dist) if dist else None


def _source_build_key(kind: str) -> str | None:
    """What the compiled library was built for: another CPU or other build options make the env stale."""
    requirement = _source_build(kind)
    return build_key(requirement, build_environ()) if requirement else None


def create_env(settings: Settings, name: str, kind: str, on_line: LineFn) -> Path:
    """Create (or bring up to date) environment ``name`` for engine ``kind``, streaming pip's output."""
    requirements = requirements_file(kind)
    path = env_dir(settings, name)
    marker = path / MARKER
    marker.unlink(missing_ok=True)  # not current until pip has finished
    if not env_python(path).exists():
        on_line(f"creating virtual environment {path}")
        venv.EnvBuilder(with_pip=True, clear=True).create(path)
    prebuilt: list[str] = []
    if (requirement := _source_build(kind)) is not None:
        try:
            prebuilt = [str(build_wheel(env_python(path), requirement, settings.pip_args, on_line, run_streaming))]
        except BuildError as exc:
            raise EnvError(str(exc)) from None
    on_line(f"installing {requirements.name} into {path}")
    command = [str(env_python(path)), "-m", "pip", "install", "--progress-bar", "off", *prebuilt, "-r", str(requirements), *settings.pip_args]
    code = run_streaming(command, on_line)
    if code != 0:
        raise EnvError(f"pip failed with exit code {code} installing {requirements} into {path}")
    if kind in POST_INSTALL:
        on_line(f"preparing {kind} (first import)")
        code = run_streaming([str(env_python(path)), "-c", POST_INSTALL[kind]], on_line)
        if code != 0:
            raise EnvError(f"the first import of {kind} failed (exit code {code}) in {path}")
    marker.write_text(
        json.dumps({"kind": kind, "requirements_sha": _digest(requirements.read_text()), "build_key": _source_build_key(kind)})
    )
    return path


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
    files = sorted(source.glob("*.py"))
    digest = _digest("".join(f.name + f.read_text(encoding="utf-8") for f in files))
    target = settings.state_dir / "runtime" / digest
    if not (target / "workers" / "__init__.py").is_file():
        staging = target.with_name(f"{digest}.tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "workers").mkdir(parents=True)
        for f in files:
            shutil.copy2(f, staging / "workers" / f.name)
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
import json, sys
from workers.runtime import installed_versions
facts = {"python": sys.version.split()[0], "executable": sys.executable, "packages": installed_versions()}
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
    python = env_python(env_dir(settings, name))
    if not python.exists():
        raise EnvError(f"environment {name!r} does not exist; run: node-supervisor envs create {name}")
    result = subprocess.run(
        [str(python), "-c", _PROBE, kind], capture_output=True, text=True, env=worker_environ(settings), timeout=120
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise EnvError(f"environment {name!r} is broken: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    facts["current"] = env_is_current(settings, name, kind)
    return facts
