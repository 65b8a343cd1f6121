"""`node-supervisor envs create|check [NAME...]`."""

from __future__ import annotations

from typing import Any

from ..config import ENGINE_KINDS, Settings
from ..node.envs import EnvError, check_env, create_env
from ..planning.measure.gpu import GpuSnapshot, cpu_only_build_on_gpu_node, probe


def _kinds_for(settings: Settings, names: list[str]) -> dict[str, str]:
    """Environment name -> engine kind.  A name is a configured env name or an engine kind."""
    configured = {config.env_name: config.kind for config in settings.engines.values()}
    if not names:
        return configured
    chosen = {}
    for name in names:
        kind = configured.get(name) or (name if name in ENGINE_KINDS else None)
        if kind is None:
            raise EnvError(
                f"unknown environment {name!r}: not used by a configured engine nor an engine kind ({', '.join(ENGINE_KINDS)})"
            )
        chosen[name] = kind
    return chosen


def envs_command(settings: Settings, command: str, names: list[str]) -> int:
    try:
        kinds = _kinds_for(settings, names)
    except EnvError as exc:
        print(f"node-supervisor: {exc}")
        return 2
    failures = 0
    snapshot = probe() if command == "check" else None
    for name, kind in kinds.items():
        try:
            if snapshot is None:
                create_env(settings, name, kind, lambda line: print(f"[{name}] {line}", flush=True))
                print(f"[{name}] ready")
            else:
                _print_check(name, check_env(settings, name, kind), snapshot)
        except EnvError as exc:
            print(f"[{name}] error: {exc}", flush=True)
            failures += 1
    return 1 if failures else 0


def _print_check(name: str, facts: dict[str, Any], snapshot: GpuSnapshot) -> None:
    packages = facts.get("packages", {})
    print(f"{name}:")
    print(f"  interpreter   {facts['executable']} (Python {facts['python']})")
    print(
        f"  up to date    {'yes' if facts['current'] else 'no: ' + (facts.get('stale') or 'stale') + '; run envs create ' + name}"
    )
    for dist in ("llama-cpp-python", "exllamav2", "torch"):
        if packages.get(dist):
            shared = " (the node's own, system_site_packages)" if dist in facts.get("reused", {}) else ""
            print(f"  {dist:<13} {packages[dist]}{shared}")
    numpy = packages.get("numpy")
    elsewhere = (
        "" if not numpy or facts.get("numpy_own") else f" (from {facts.get('numpy_file')}, not the environment's own!)"
    )
    print(f"  numpy         {numpy or 'not installed'}{elsewhere}")
    _print_gpu_build(name, facts, snapshot)
    if "cuda_available" in facts:
        print(
            f"  cuda          {'available' if facts['cuda_available'] else 'not available (torch sees no CUDA device)'}"
        )
    if "unavailable" in facts:
        print(f"  engine        unavailable: {facts['unavailable']}")


def _print_gpu_build(name: str, facts: dict[str, Any], snapshot: GpuSnapshot) -> None:
    """llama.cpp's build as recorded and as it reports itself, and the warning a CPU-only build on a GPU node earns."""
    engine = facts.get("engine", {})
    build = facts.get("build")
    if build is not None:
        args = f'CMAKE_ARGS="{build.get("cmake_args", "")}"; ' if build.get("cmake_args") else ""
        print(f"  build         {'CUDA' if build.get('cuda') else 'CPU'} ({args}{build.get('reason', '')})")
    if "gpu_offload" not in engine:
        return
    if build is None:
        print("  build         options not recorded (built before they were; envs create records them)")
    built = ", ".join(engine.get("gpu_backends_built") or []) or "none (CPU-only build)"
    print(f"  gpu offload   {'yes' if engine['gpu_offload'] else 'no'}; GPU backends built: {built}")
    gpus = (
        f"{len(snapshot.devices)} NVIDIA GPU(s), driver {snapshot.driver_version}, CUDA {snapshot.cuda_version}"
        if snapshot.devices
        else snapshot.reason
    )
    print(f"  node GPUs     {gpus}")
    warning = cpu_only_build_on_gpu_node(facts, snapshot)
    if warning:
        print(f"  WARNING       {warning}")
    elif not engine.get("gpu_backends_built"):
        print(
            '                to use a GPU, recreate with CMAKE_ARGS="-DGGML_CUDA=on" node-supervisor envs create '
            + name
        )
