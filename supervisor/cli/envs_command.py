"""`node-supervisor envs create|check [NAME...]`."""

from __future__ import annotations

from ..config import ENGINE_KINDS, Settings
from ..envs import EnvError, check_env, create_env


def _kinds_for(settings: Settings, names: list[str]) -> dict[str, str]:
    """Environment name -> engine kind.  A name is a configured env name or an engine kind."""
    configured = {config.env_name: config.kind for config in settings.engines.values()}
    if not names:
        return configured
    chosen = {}
    for name in names:
        kind = configured.get(name) or (name if name in ENGINE_KINDS else None)
        if kind is None:
            raise EnvError(f"unknown environment {name!r}: not used by a configured engine nor an engine kind ({', '.join(ENGINE_KINDS)})")
        chosen[name] = kind
    return chosen


def envs_command(settings: Settings, command: str, names: list[str]) -> int:
    try:
        kinds = _kinds_for(settings, names)
    except EnvError as exc:
        print(f"node-supervisor: {exc}")
        return 2
    failures = 0
    for name, kind in kinds.items():
        try:
            if command == "create":
                create_env(settings, name, kind, lambda line: print(f"[{name}] {line}", flush=True))
                print(f"[{name}] ready")
            else:
                _print_check(name, check_env(settings, name, kind))
        except EnvError as exc:
            print(f"[{name}] error: {exc}", flush=True)
            failures += 1
    return 1 if failures else 0


def _print_check(name: str, facts: dict) -> None:
    packages = facts.get("packages", {})
    engine = facts.get("engine", {})
    print(f"{name}:")
    print(f"  interpreter   {facts['executable']} (Python {facts['python']})")
    print(f"  up to date    {'yes' if facts['current'] else 'no: run envs create ' + name}")
    for dist in ("llama-cpp-python", "exllamav2", "torch"):
        if packages.get(dist):
            print(f"  {dist:<13} {packages[dist]}")
    print(f"  numpy         {packages.get('numpy') or 'not installed'}")
    if "gpu_offload" in engine:
        built = ", ".join(engine.get("gpu_backends_built") or []) or "none (CPU-only build)"
        print(f"  gpu offload   {'yes' if engine['gpu_offload'] else 'no'}; GPU backends built: {built}")
        if not engine.get("gpu_backends_built"):
            print('                to use a GPU, recreate with CMAKE_ARGS="-DGGML_CUDA=on" node-supervisor envs create ' + name)
    if "cuda_available" in facts:
        print(f"  cuda          {'available' if facts['cuda_available'] else 'not available (torch sees no CUDA device)'}")
    if "unavailable" in facts:
        print(f"  engine        unavailable: {facts['unavailable']}")
