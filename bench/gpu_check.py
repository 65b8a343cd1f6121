"""One GPU check: build the llama.cpp environment for this node, run the ``cuda``-marked tests, then the
benchmark with ``--gpu``, printing each phase's time and writing every figure as JSON.

    make gpu-check [GPU_CHECK_ARGS="--model /path/model.gguf --only tests,bench"]
    .venv/bin/python bench/gpu_check.py [--cpu] [--model GGUF] [--only P,..] [--skip P,..] [--plan] [--out FILE]

Made for a machine with an NVIDIA GPU, nvcc and no package index, lent for a
few minutes: pip reaches a wheel folder through its own options
(``PIP_NO_INDEX=1 PIP_FIND_LINKS=<folder>``, or the config key ``pip_args``),
which hold what shared/gpu/fetch.sh gathers (the wheels and a trimmed
llama-cpp-python sdist, whose vendored llama.cpp builds llama-server and
converts the test model).  Phases, in order (``--only``/``--skip`` select):

  exl2-env  (GPU, background) the ExLlamaV2 environment on the node's CUDA torch; its extension
            compiles on first import, beside the llama.cpp build
  model     ``--model`` as given; else (GPU, background) a random-weight 1.1B Llama made as
            shared/gpu/README.md describes (make_model, then convert with the vendored llama.cpp
            of the pinned llama-cpp-python sdist), its fp16 folder the EXL2 model too; (CPU) the
            default model
  env       the llama.cpp environment, CUDA as the node chooses it (supervisor/node/builds.py
            ``build_choice``: the node's GPU architecture only); kept when already current
  server    (background) llama-server against the environment's own installed ggml
            (bench/llama_server_build.py), built while the model is quantized and the tests run
  quantize  the made model to Q4_K_M with the environment's llama.cpp (shared/gpu/quantize.py)
  tests     ``pytest -m cuda``: the llama.cpp worker on CUDA (tests/test_cuda_llamacpp_*.py) and the
            ExLlamaV2 GPU tests; without CUDA each skips naming what is missing
  bench     bench/compare.py (``--gpu`` on a GPU) on the same model

``--cpu`` runs the same phases on a machine without CUDA (the tests skip with
their reason, the benchmark is the CPU one, short), so that the check itself
is tried before a GPU machine is lent.  ``--plan`` prints the phases and their
commands and runs nothing.  The whole check is meant to fit 8 minutes on a
16-core H100/H200; the JSON (``--out``, default
bench/results/gpu-check-<time>.json) holds each phase's seconds, the test
outcomes, the benchmark's figures and the GPU that NVML saw.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
PHASES = ("exl2-env", "model", "env", "server", "quantize", "tests", "bench")
GPU_ONLY = ("exl2-env",)
BUDGET_S = 480  # 8 minutes on a 16-core H100/H200
# The benchmark's options: on a GPU, compare.py's own defaults; on the CPU, a short run of the same paths.
BENCH_ARGS = {
    "gpu": [],
    "cpu": ["--rounds", "2", "--concurrent-rounds", "1", "--tokens", "16", "--routing-seconds", "2"],
}
GGUF_NAME = "gpu-check-q4_k_m.gguf"


@dataclass
class Phase:
    """One step: its commands, run in order, with ``environ`` over the check's own environment."""

    name: str
    why: str
    commands: list[list[str]] = field(default_factory=list)
    environ: dict[str, str] = field(default_factory=dict)
    background: bool = False  # started, and waited for by the phases in ``after`` of a later one (or at the end)
    after: tuple[str, ...] = ()  # background phases that must have finished first
    needs: tuple[str, ...] = ()  # of those, the ones without which it cannot run
    unset: tuple[str, ...] = ()  # variables removed from its environment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run the same phases without CUDA (the tests skip)")
    parser.add_argument(
        "--model", type=Path, help="a GGUF model (default: made on a GPU, the default model on the CPU)"
    )
    parser.add_argument("--exl2-model", type=Path, help="an EXL2/fp16 model folder for the ExLlamaV2 tests")
    parser.add_argument("--only", default="", help=f"comma-separated phases to run, of {','.join(PHASES)}")
    parser.add_argument("--skip", default="", help="comma-separated phases to leave out")
    parser.add_argument("--state", type=Path, help="state directory (default: NODESUP_TEST_STATE, else <repo>/.state)")
    parser.add_argument(
        "--shared", type=Path, help="shared/gpu (make_model.py, convert.py, quantize.py, tokenizer/); found if omitted"
    )
    parser.add_argument("--torch-python", default="python3", help="an interpreter with torch and transformers")
    parser.add_argument("--bench-args", help="arguments for bench/compare.py (default: by mode)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    parser.add_argument("--out", type=Path, help="the JSON report (default: bench/results/gpu-check-<time>.json)")
    parser.add_argument("--plan", action="store_true", help="print the phases and their commands; run nothing")
    args = parser.parse_args(argv)
    args.selected = select(args.only, args.skip, args.cpu)
    return args


def select(only: str, skip: str, cpu: bool) -> list[str]:
    """The phases to run, in their order: ``only`` (all when empty) less ``skip``; the GPU-only ones not on the CPU."""
    named = {
        "--only": [p.strip() for p in only.split(",") if p.strip()],
        "--skip": [p.strip() for p in skip.split(",") if p.strip()],
    }
    for option, names in named.items():
        unknown = [n for n in names if n not in PHASES]
        if unknown:
            raise SystemExit(f"error: {option}: no phase {', '.join(unknown)} (phases: {', '.join(PHASES)})")
    chosen = named["--only"] or list(PHASES)
    return [p for p in PHASES if p in chosen and p not in named["--skip"] and not (cpu and p in GPU_ONLY)]


def find_shared(given: Path | None) -> Path | None:
    """shared/gpu: as given, else inside the checkout (it travels to a device machine), else beside it."""
    candidates = [given] if given else [REPO / "shared" / "gpu", REPO.parent / "shared" / "gpu"]
    return next((c.resolve() for c in candidates if (c / "make_model.py").is_file()), None)


def plan(args: argparse.Namespace, state: Path, is_current: Callable[[str], bool]) -> list[Phase]:
    """The selected phases with their commands.  ``is_current(env)``: an environment that needs no building."""
    python = sys.executable
    cli = [python, "-m", "supervisor.cli"]
    work = state / "gpu-check"
    gpu = not args.cpu
    shared = find_shared(args.shared)
    made = gpu and args.model is None
    model = args.model.resolve() if args.model else (work / GGUF_NAME if gpu else None)
    exl2_model = args.exl2_model.resolve() if args.exl2_model else (work / "hf" if made else None)
    base = {
        "NODESUP_TEST_STATE": str(state)
    }  # the tests' and the report's (their daemons have state dirs of their own)
    envs = {**base, "NODESUP_STATE_DIR": str(state), "NODESUP_DATA_DIR": str(state / "data")}  # envs create's
    phases: dict[str, Phase] = {}

    phases["model"], phases["quantize"] = model_phases(args, state, work, shared, made, base)
    model_text = str(model) if model else "the default model"

    exl2 = Phase("exl2-env", "ExLlamaV2 on the node's CUDA torch; its extension compiles now", background=True)
    exl2.environ = {
        **envs,
        "NODESUP_ENVS__EXLLAMAV2__SYSTEM_SITE_PACKAGES": "true",
        "MAX_JOBS": str(max(1, args.jobs // 2)),  # beside the llama.cpp build
    }
    if not is_current("exllamav2"):
        exl2.commands.append([*cli, "envs", "create", "exllamav2"])
    phases["exl2-env"] = exl2

    env = Phase("env", "llama.cpp as the node chooses it (on an NVIDIA node: CUDA, its GPU architecture only)")
    env.environ = {**envs, "CMAKE_BUILD_PARALLEL_LEVEL": str(args.jobs)}
    env.unset = ("CMAKE_ARGS",)  # the node chooses: a caller's CMAKE_ARGS would be an explicit choice instead
    if not is_current("llamacpp"):
        env.commands.append([*cli, "envs", "create", "llamacpp"])
    phases["env"] = env

    server = Phase("server", "llama-server on the environment's own ggml", background=True)
    server.environ = dict(base)
    server.commands.append([python, "bench/llama_server_build.py", *(["--gpu"] if gpu else [])])
    phases["server"] = server

    tests = Phase("tests", f"pytest -m cuda on {model_text}", after=("exl2-env", "model"))
    tests.environ = {**base, **({"CUDA_TEST_GGUF": str(model)} if model else {})}
    if exl2_model is not None:
        tests.environ["NODESUP_EXL2_MODEL_DIR"] = str(exl2_model)
    pytest = [python, "-m", "pytest", "-m", "cuda", "-rs", "-p", "no:cacheprovider", f"--junitxml={work / 'tests.xml'}"]
    if gpu and "exl2-env" not in args.selected and not is_current("exllamav2"):
        tests.why += "; ExLlamaV2's tests left out (no environment for them, exl2-env not run)"
        pytest.append("--ignore=tests/test_exllamav2_gpu.py")
    tests.commands.append(pytest)
    phases["tests"] = tests

    bench = Phase(
        "bench", f"bench/compare.py{' --gpu' if gpu else ''} on {model_text}", after=("server",), needs=("server",)
    )
    bench.environ = dict(base)
    extra = shlex.split(args.bench_args) if args.bench_args is not None else BENCH_ARGS["gpu" if gpu else "cpu"]
    bench.commands.append(
        [
            python,
            "bench/compare.py",
            *(["--gpu"] if gpu else []),
            *(["--model", str(model)] if model else []),
            "--out",
            str(work / "bench.json"),
            *extra,
        ]
    )
    phases["bench"] = bench
    return [phases[name] for name in args.selected]


def model_phases(
    args: argparse.Namespace, state: Path, work: Path, shared: Path | None, made: bool, base: dict[str, str]
) -> tuple[Phase, Phase]:
    """Making the model (no llama.cpp environment needed: beside its build), then quantizing it (with it)."""
    if not made:
        given = Phase("model", f"as given: {args.model}" if args.model else "the default model (made once)")
        return given, Phase("quantize", "nothing to quantize")
    gguf = work / GGUF_NAME
    if gguf.is_file():
        return Phase("model", f"made earlier: {gguf}"), Phase("quantize", f"made earlier: {gguf}")
    if shared is None:
        if "model" in args.selected or "quantize" in args.selected:
            raise SystemExit("error: no shared/gpu (make_model.py, convert.py, quantize.py): give --shared or --model")
        return Phase("model", "not made"), Phase("quantize", "not made")
    make = Phase("model", "a random-weight 1.1B Llama (shared/gpu), converted to an f16 GGUF", background=True)
    make.environ = dict(base)
    make.commands = [
        [args.torch_python, str(shared / "make_model.py"), str(work / "hf"), str(shared / "tokenizer")],
        [sys.executable, "bench/llama_server_build.py", "--source", str(work / "source")],
        [
            args.torch_python,
            str(shared / "convert.py"),
            str(work / "source" / "llama.cpp"),
            str(work / "hf"),
            str(work / "f16.gguf"),
        ],
    ]
    quantize = Phase("quantize", "the made model to Q4_K_M", after=("model",), needs=("model",))
    quantize.environ = dict(base)
    env_python = state / "envs" / "llamacpp" / "bin" / "python"
    quantize.commands = [
        [
            str(env_python),
            str(shared / "quantize.py"),
            str(work / "f16.gguf"),
            str(gguf),
            "LLAMA_FTYPE_MOSTLY_Q4_K_M",
            str(args.jobs),
        ]
    ]
    return make, quantize


def describe(phases: list[Phase]) -> str:
    lines = []
    for phase in phases:
        how = " (background)" if phase.background else ""
        lines.append(f"{phase.name}{how}: {phase.why}")
        for key in sorted(phase.environ):
            lines.append(f"    {key}={phase.environ[key]}")
        for command in phase.commands or [["(nothing to run)"]]:
            lines.append(f"  $ {shlex.join(command)}")
    return "\n".join(lines)


class Runner:
    """Runs phases in order, background ones (a thread each, their commands in turn) beside the next;
    prints and records each one's seconds, a background one's until its last command ended."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started = time.monotonic()
        self.results: dict[str, dict[str, Any]] = {}
        self.running: dict[str, threading.Thread] = {}

    def say(self, text: str) -> None:
        print(f"[gpu-check {time.monotonic() - self.started:6.1f} s] {text}", flush=True)

    def run(self, phase: Phase) -> bool:
        for name in phase.after:
            if name in self.running:
                self.wait(name)
            if name in phase.needs and self.results.get(name, {}).get("status") == "failed":
                self.record(phase, 0.0, "failed", f"{name} failed")
                return False
        self.say(f"{phase.name}: {phase.why}{' (background)' if phase.background else ''}")
        if phase.background:
            thread = threading.Thread(target=self._commands, args=(phase, self.logs / f"{phase.name}.log"))
            self.running[phase.name] = thread
            thread.start()
            return True
        return self._commands(phase, None)

    def _commands(self, phase: Phase, log: Path | None) -> bool:
        """The phase's commands in turn (output to ``log`` if given, else here), then its record."""
        started = time.monotonic()
        environ = {k: v for k, v in os.environ.items() if k not in phase.unset}
        environ = {**environ, **phase.environ, "PYTHONUNBUFFERED": "1"}
        for command in phase.commands:
            self.say(f"{phase.name}: $ {shlex.join(command)}{f' (output in {log})' if log else ''}")
            if log is None:
                code = subprocess.run(command, cwd=REPO, env=environ).returncode
            else:
                with log.open("ab") as out:
                    code = subprocess.run(command, cwd=REPO, env=environ, stdout=out, stderr=out).returncode
            if code != 0:
                if log is not None:
                    print("\n".join(log.read_text(errors="replace").splitlines()[-20:]), flush=True)
                self.record(phase, time.monotonic() - started, "failed", f"exit code {code}: {shlex.join(command)}")
                return False
        self.record(phase, time.monotonic() - started, "passed")
        return True

    def wait(self, name: str) -> None:
        self.running.pop(name).join()

    def finish(self) -> None:
        for name in list(self.running):
            self.wait(name)

    def record(self, phase: Phase, seconds: float, status: str, why: str = "") -> None:
        ran = "nothing to run" if not phase.commands and status == "passed" else status
        self.results[phase.name] = {
            "status": status,
            "seconds": round(seconds, 1),
            "why": phase.why,
            "commands": [shlex.join(c) for c in phase.commands],
            **({"error": why} if why else {}),
        }
        self.say(f"{phase.name}: {ran} in {seconds:.1f} s{': ' + why if why else ''}")


def test_outcomes(junit: Path) -> dict[str, Any] | None:
    """Each test's outcome (and a skip's reason) from pytest's JUnit XML."""
    if not junit.is_file():
        return None
    outcomes: dict[str, Any] = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        found = next((child for child in case if child.tag in ("skipped", "failure", "error")), None)
        if found is None:
            outcomes[name] = {"outcome": "passed", "seconds": float(case.get("time") or 0)}
        else:
            outcomes[name] = {"outcome": found.tag, "reason": (found.get("message") or "")[:500]}
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome["outcome"]] = counts.get(outcome["outcome"], 0) + 1
    return {"counts": counts, "tests": outcomes}


def gpu_facts() -> dict[str, Any]:
    from supervisor.planning.measure.gpu import probe

    snapshot = probe()
    devices = [{"index": d.index, "name": d.name, "total_mib": d.total_bytes >> 20} for d in snapshot.devices]
    return {"devices": devices, "reason": snapshot.reason}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from supervisor.config import load_settings
    from supervisor.node.envs import env_is_current

    state = (args.state or Path(os.environ.get("NODESUP_TEST_STATE") or REPO / ".state")).resolve()
    settings = load_settings(None, {"state_dir": state, "data_dir": state / "data"})
    phases = plan(args, state, lambda name: env_is_current(settings, name, name))
    print(describe(phases), flush=True)
    if args.plan:
        return 0
    work = state / "gpu-check"
    work.mkdir(parents=True, exist_ok=True)
    (work / "tests.xml").unlink(missing_ok=True)
    (work / "bench.json").unlink(missing_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runner = Runner(work)
    for phase in phases:
        if not runner.run(phase) and phase.name in ("env", "quantize"):
            break  # nothing after these can run
    runner.finish()
    total = time.monotonic() - runner.started
    bench = work / "bench.json"
    report = {
        "started": started,
        "mode": "cpu" if args.cpu else "gpu",
        "gpu": gpu_facts(),
        "argv": sys.argv[1:] if argv is None else argv,
        "phases": runner.results,
        "total_seconds": round(total, 1),
        "budget_seconds": BUDGET_S,
        "within_budget": total <= BUDGET_S,
        "tests": test_outcomes(work / "tests.xml"),
        "bench": json.loads(bench.read_text()) if bench.is_file() else None,
    }
    out = args.out or REPO / "bench" / "results" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\nphase      status   seconds")
    for name, result in runner.results.items():
        print(f"{name:<10} {result['status']:<8} {result['seconds']:7.1f}")
    print(f"{'total':<10} {'':<8} {total:7.1f}  (budget {BUDGET_S} s)")
    if report["tests"]:
        print(f"tests: {report['tests']['counts']}")
    print(f"every figure: {out}")
    failed = [n for n, r in runner.results.items() if r["status"] != "passed"]
    return 1 if failed or len(runner.results) < len(phases) else 0


if __name__ == "__main__":
    sys.exit(main())
