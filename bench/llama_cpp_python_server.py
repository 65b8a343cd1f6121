"""llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``) as a benchmark path.

The server runs from an environment of the benchmark's own, made once and
kept in ``<state>/bench/llama-cpp-python-server-<version>/``: a virtual
environment of the llama.cpp environment's interpreter holding that
environment's very build of llama-cpp-python, its installed files copied as
they are (nothing rebuilt: the same compiled llama.cpp the worker and the
baseline load), the versions that environment has of what the library
requires (numpy, ...), and the ``server`` extra's packages from the package
index (pip sees the library installed and adds only those;
``--only-binary`` keeps it from ever building one).  ``bench-env.json`` records the library's
version, a digest of its installed files (their RECORD), and the server's
packages; the environment is reused while the version and digest match.

The server loads the model as the daemon's worker has it in force (threads,
batch sizes, flash attention, GPU layers, the context), and as the baseline
calls the library otherwise: its own defaults differ from the library's in
``logits_all`` (on: logits of every prompt token, and a context-sized score
array) and ``use_mlock`` (on), so both are turned off, and ``verbose`` off
(no timings printed per request).  It serves one request at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from bench.http_stream import OpenAICompletions, length_finish_tokens
from bench.llama_server import ServerProcess, free_port
from bench.llama_server_build import ServerBuildError, installed_llama
from supervisor.config import Settings
from supervisor.node.envs import env_python

LineFn = Callable[[str], None]
DIST = "llama-cpp-python"
MARKER = "bench-env.json"
# Run by the llama.cpp environment's interpreter: where its llama-cpp-python lies, its files, their RECORD,
# and the versions there of what the library itself requires (numpy, ...), which the bench environment gets too.
LOCATE = """
import json, re, importlib.metadata as m
d = m.distribution("llama-cpp-python")
needs = [re.split(r"[ ;<>=!~\\[]", r, maxsplit=1)[0] for r in d.requires or () if "extra ==" not in r]
pins = [f"{n}=={m.version(n)}" for n in needs]
print(json.dumps({"site": str(d.locate_file("")), "files": [str(f) for f in d.files or ()], "record": d.read_text("RECORD") or "", "pins": pins}))
"""
# Run by the bench environment's: the library as imported, the server's settings, the server extra's packages.
CHECK = """
import json, re, importlib.metadata as m
import llama_cpp
from llama_cpp.server.settings import Settings
extra = [re.split(r"[ ;<>=!~\\[]", r, maxsplit=1)[0] for r in m.requires("llama-cpp-python") or () if 'extra == "server"' in r]
print(json.dumps({"version": llama_cpp.__version__, "settings": sorted(Settings.model_fields), "packages": {n: m.version(n) for n in extra}}))
"""


class ServerEnvError(Exception):
    """The bench environment for llama-cpp-python's server cannot be made; the message says why."""


def server_env_dir(settings: Settings, version: str) -> Path:
    return settings.state_dir / "bench" / f"llama-cpp-python-server-{version}"


def _python_json(python: Path, code: str, what: str) -> dict[str, Any]:
    found = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    if found.returncode != 0:
        raise ServerEnvError(f"{what} failed: {found.stderr.strip()[-500:]}")
    return json.loads(found.stdout)


def _run(command: list[str], on_line: LineFn, what: str) -> None:
    on_line(f"{what}: {' '.join(command)}")
    done = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", timeout=1800
    )
    if done.returncode != 0:
        raise ServerEnvError(
            f"{what} failed (exit code {done.returncode}):\n" + "\n".join(done.stdout.splitlines()[-20:])
        )


def reuse_reason(directory: Path, wanted: dict[str, Any]) -> str | None:
    """None when the kept environment was made as ``wanted`` (version, digest of the installed files, pins); else why it must be made."""
    try:
        recorded = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return "not made yet"
    if not env_python(directory).is_file():
        return "its interpreter is missing"
    changed = [key for key, value in wanted.items() if recorded.get(key) != value]
    return f"made with another {', '.join(changed)}" if changed else None


def ensure_server_env(settings: Settings, on_line: LineFn) -> dict[str, Any]:
    """The bench environment's record (bench-env.json, with ``python``): made now if missing or stale."""
    try:
        installed = installed_llama(settings)
    except ServerBuildError as exc:
        raise ServerEnvError(str(exc)) from exc
    source = _python_json(env_python(installed["env"]), LOCATE, f"finding {DIST} in {installed['env']}")
    wanted = {
        "version": installed["version"],
        "record_sha256": hashlib.sha256(source["record"].encode()).hexdigest(),
        "pins": source["pins"],
    }
    directory = server_env_dir(settings, installed["version"])
    reason = reuse_reason(directory, wanted)
    if reason is not None:
        on_line(f"making llama-cpp-python's server environment ({reason}) in {directory}: once")
        _make(settings, directory, installed["env"], source, wanted, on_line)
    return {**json.loads((directory / MARKER).read_text()), "python": str(env_python(directory))}


def _make(
    settings: Settings,
    directory: Path,
    source_env: Path,
    source: dict[str, Any],
    wanted: dict[str, Any],
    on_line: LineFn,
) -> None:
    started = time.monotonic()
    shutil.rmtree(directory, ignore_errors=True)
    # The environment's interpreter makes a virtual environment of its own base interpreter: the same Python.
    _run([str(env_python(source_env)), "-m", "venv", str(directory)], on_line, "making the environment")
    python = env_python(directory)
    site = Path(
        _python_json(
            python,
            "import json, sysconfig; print(json.dumps({'site': sysconfig.get_path('purelib')}))",
            "finding site-packages",
        )["site"]
    )
    for name in source["files"]:
        if name.startswith(".."):
            continue  # nothing of the library's lies outside site-packages; scripts would, and it has none
        target = site / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(source["site"]) / name, target)
    on_line(f"copied {DIST} {wanted['version']} as installed in {source_env} ({len(source['files'])} files)")
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off", "--only-binary", DIST]
    _run(
        [*pip, f"{DIST}[server]=={wanted['version']}", *wanted["pins"], *settings.pip_args],
        on_line,
        "installing the server's packages",
    )
    check = _python_json(python, CHECK, "importing llama_cpp.server in the new environment")
    if check["version"] != wanted["version"]:
        raise ServerEnvError(f"the new environment imports llama_cpp {check['version']}, not {wanted['version']}")
    record = {
        **wanted,
        "source": source["site"],
        "packages": check["packages"],
        "settings": check["settings"],
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.monotonic() - started),
    }
    (directory / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    on_line(
        f"llama-cpp-python's server environment made in {record['seconds']} s: "
        + ", ".join(f"{k} {v}" for k, v in record["packages"].items())
    )


def server_command(python: Path, model: Path, alias: str, port: int, n_ctx: int, settings: dict[str, Any]) -> list[str]:
    """``python -m llama_cpp.server``'s arguments: the model loaded with ``settings`` (common.in_force) and ``n_ctx``."""
    return [
        str(python),
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(settings["n_threads"]),
        "--n_threads_batch",
        str(settings["n_threads_batch"]),
        "--n_batch",
        str(settings["n_batch"]),
        "--n_ubatch",
        str(settings["n_ubatch"]),
        "--flash_attn",
        "true" if settings["flash_attn"] else "false",
        "--n_gpu_layers",
        str(int(settings["n_gpu_layers"])),
        "--logits_all",
        "false",
        "--use_mlock",
        "false",
        "--verbose",
        "false",
    ]


def server_environ(setting_names: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment less what the server would read as its settings: pydantic-settings takes any
    variable named as a setting (MODEL, N_CTX, CACHE, ...), and uvicorn's HOST and PORT override the flags."""
    dropped = {name.lower() for name in setting_names} | {"host", "port", "config_file"}
    return {
        key: value for key, value in (os.environ if environ is None else environ).items() if key.lower() not in dropped
    }


def completions_client(port: int, alias: str) -> OpenAICompletions:
    """Its /v1/completions, greedy at temperature 0, and ``repeat_penalty`` 1 as on the other paths (this
    server's request default is 1.1).  It has no ``ignore_eos``, and its equivalents (``min_tokens``,
    ``logit_bias``) run a Python logits processor over the whole vocabulary every token and ban only the
    model's EOS among its end-of-generation tokens; so nothing is banned, as on the baseline, and every
    stream is checked to have finished for its length instead (length_finish_tokens)."""
    return OpenAICompletions(port, alias, {"repeat_penalty": 1.0}, length_finish_tokens)


class LlamaCppPythonServer(ServerProcess):
    """``python -m llama_cpp.server`` from the bench environment (``record``: ensure_server_env's) on a free loopback port."""

    name = "llama-cpp-python's server"
    ready_path = "/v1/models"  # served once the model is loaded: the server loads it before it listens

    def __init__(self, record: dict[str, Any], model: Path, n_ctx: int, settings: dict[str, Any], log: Path) -> None:
        port = free_port()
        self.alias = model.stem
        command = server_command(Path(record["python"]), model, self.alias, port, n_ctx, settings)
        super().__init__(command, port, log, server_environ(record["settings"]))

    def client(self) -> OpenAICompletions:
        return completions_client(self.port, self.alias)
