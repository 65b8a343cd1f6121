"""bench/gpu_check.py (make gpu-check): its options, the phases it plans and their commands, and how it runs
them (in order, background ones beside the next, a phase that needs a failed one not run), on stand-in
commands.  The check itself runs for real with ``--cpu`` (docs/BENCHMARKS.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench import gpu_check
from bench.gpu_check import PHASES, Phase, Runner, parse_args, plan, select


def shared_gpu(tmp_path: Path) -> Path:
    folder = tmp_path / "shared" / "gpu"
    (folder / "tokenizer").mkdir(parents=True)
    for name in ("make_model.py", "convert.py", "quantize.py"):
        (folder / name).write_text("")
    return folder


def planned(argv: list[str], state: Path, current: tuple[str, ...] = ()) -> dict[str, Phase]:
    return {phase.name: phase for phase in plan(parse_args(argv), state, lambda env: env in current)}


def test_phases_are_selected_in_their_own_order_and_the_gpu_only_ones_left_out_on_the_cpu():
    assert select("", "", cpu=False) == list(PHASES)
    assert select("", "", cpu=True) == [p for p in PHASES if p != "exl2-env"]
    assert select("bench, tests", "", cpu=False) == ["tests", "bench"]
    assert select("", "exl2-env,server", cpu=False) == ["model", "env", "quantize", "tests", "bench"]
    # Made beside the llama.cpp build: the model (needs none), llama-server (while the model is quantized, tested)
    assert PHASES.index("model") < PHASES.index("env") < PHASES.index("server") < PHASES.index("quantize")
    assert select("exl2-env", "", cpu=True) == []


def test_an_unknown_phase_is_refused_naming_it_and_the_phases():
    with pytest.raises(SystemExit, match=r"--skip: no phase gpu \(phases: exl2-env, model, env, server, quantize"):
        parse_args(["--skip", "gpu"])
    with pytest.raises(SystemExit, match="--only: no phase benchmark"):
        parse_args(["--only", "env,benchmark"])


def test_on_a_gpu_without_a_model_one_is_made_and_every_phase_uses_it(tmp_path):
    shared = shared_gpu(tmp_path)
    phases = planned(["--shared", str(shared), "--jobs", "16"], tmp_path / "state")
    work = tmp_path / "state" / "gpu-check"
    gguf = str(work / gpu_check.GGUF_NAME)
    assert list(phases) == list(PHASES)
    make, source, convert = phases["model"].commands
    (quantize,) = phases["quantize"].commands
    assert make[1:] == [str(shared / "make_model.py"), str(work / "hf"), str(shared / "tokenizer")]
    assert source[1:] == ["bench/llama_server_build.py", "--source", str(work / "source")]
    assert convert[1:] == [
        str(shared / "convert.py"),
        str(work / "source" / "llama.cpp"),
        str(work / "hf"),
        str(work / "f16.gguf"),
    ]
    assert quantize[0] == str(tmp_path / "state" / "envs" / "llamacpp" / "bin" / "python")
    assert quantize[2:] == [str(work / "f16.gguf"), gguf, "LLAMA_FTYPE_MOSTLY_Q4_K_M", "16"]
    assert phases["tests"].environ["CUDA_TEST_GGUF"] == gguf
    assert phases["tests"].environ["NODESUP_EXL2_MODEL_DIR"] == str(work / "hf")  # the fp16 folder loads in ExLlamaV2
    assert phases["tests"].commands[0][1:5] == ["-m", "pytest", "-m", "cuda"]
    (bench,) = phases["bench"].commands
    assert bench[1:3] == ["bench/compare.py", "--gpu"] and bench[bench.index("--model") + 1] == gguf
    assert bench[bench.index("--out") + 1] == str(work / "bench.json")
    assert phases["server"].commands == [[sys.executable, "bench/llama_server_build.py", "--gpu"]]
    assert phases["server"].background and phases["bench"].needs == ("server",)
    assert phases["model"].background and phases["quantize"].needs == ("model",)
    assert (
        phases["exl2-env"].background and phases["tests"].after == ("exl2-env", "model") and not phases["tests"].needs
    )
    for phase in phases.values():  # every phase on the check's own state
        assert phase.environ["NODESUP_TEST_STATE"] == str(tmp_path / "state")
        # Environments are made there; a daemon that a test or the report starts keeps a state dir of its own.
        made_there = phase.name in ("env", "exl2-env")
        assert (phase.environ.get("NODESUP_STATE_DIR") == str(tmp_path / "state")) is made_there, phase.name


def test_the_node_chooses_the_build_and_current_environments_are_kept(tmp_path):
    phases = planned(["--model", str(tmp_path / "m.gguf")], tmp_path)
    env = phases["env"]
    assert env.commands == [[sys.executable, "-m", "supervisor.cli", "envs", "create", "llamacpp"]]
    assert env.unset == ("CMAKE_ARGS",)  # a caller's CMAKE_ARGS would override the node's choice
    assert phases["exl2-env"].environ["NODESUP_ENVS__EXLLAMAV2__SYSTEM_SITE_PACKAGES"] == "true"
    kept = planned(["--model", str(tmp_path / "m.gguf")], tmp_path, current=("llamacpp", "exllamav2"))
    assert kept["env"].commands == [] and kept["exl2-env"].commands == []
    # Without ExLlamaV2's environment, and not making it, its tests are left out, and the plan says so.
    (without,) = planned(["--model", str(tmp_path / "m.gguf"), "--skip", "exl2-env"], tmp_path)["tests"].commands
    assert without[-1] == "--ignore=tests/test_exllamav2_gpu.py"
    assert "--ignore=tests/test_exllamav2_gpu.py" not in kept["tests"].commands[0]


def test_a_given_model_is_used_as_it_is_and_the_cpu_mode_runs_the_same_phases_without_cuda(tmp_path):
    model = tmp_path / "given.gguf"
    gpu = planned(["--model", str(model)], tmp_path)
    assert gpu["model"].commands == gpu["quantize"].commands == [] and gpu["tests"].environ["CUDA_TEST_GGUF"] == str(
        model
    )
    assert "NODESUP_EXL2_MODEL_DIR" not in gpu["tests"].environ  # nothing made: ExLlamaV2's tests say what they need
    cpu = planned(["--cpu"], tmp_path)
    assert list(cpu) == ["model", "env", "server", "quantize", "tests", "bench"]
    assert cpu["model"].commands == [] and "CUDA_TEST_GGUF" not in cpu["tests"].environ  # the default model
    (bench,) = cpu["bench"].commands
    assert (
        "--gpu" not in bench
        and "--model" not in bench
        and bench[-len(gpu_check.BENCH_ARGS["cpu"]) :] == gpu_check.BENCH_ARGS["cpu"]
    )
    assert cpu["server"].commands == [[sys.executable, "bench/llama_server_build.py"]]
    custom = planned(["--cpu", "--bench-args", "--rounds 1 --tokens 8"], tmp_path)
    assert custom["bench"].commands[0][-4:] == ["--rounds", "1", "--tokens", "8"]


def test_making_a_model_without_shared_gpu_is_refused_with_what_to_give(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "find_shared", lambda given: None)
    with pytest.raises(SystemExit, match="give --shared or --model"):
        planned([], tmp_path)
    later = planned(["--only", "tests,bench"], tmp_path)  # made in an earlier run: where the phases expect it
    assert later["tests"].environ["CUDA_TEST_GGUF"] == str(tmp_path / "gpu-check" / gpu_check.GGUF_NAME)


def test_plan_prints_the_phases_and_their_commands_and_runs_nothing(tmp_path, capsys):
    assert gpu_check.main(["--cpu", "--plan", "--state", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tests: pytest -m cuda" in out and "$ " in out and "server (background)" in out
    assert not (tmp_path / "gpu-check").exists()


def step(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_phases_run_in_order_a_background_one_beside_the_next_and_a_failed_need_stops_only_its_dependant(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    touch = "import pathlib, sys; pathlib.Path(sys.argv[1]).touch()"
    wait_for = (
        "import pathlib, sys, time\n"
        "deadline = time.monotonic() + 60\n"
        "while not pathlib.Path(sys.argv[1]).exists():\n"
        "    if time.monotonic() > deadline: raise SystemExit(1)\n"
        "    time.sleep(0.01)"
    )
    runner = Runner(tmp_path)
    # The foreground phase waits for what the background phase's second command makes: the background's
    # commands go on, one after the other, while the foreground runs.
    slow = [[*step(touch), str(marks / "first")], [*step(touch), str(marks / "second")]]
    assert runner.run(Phase("slow", "background", slow, background=True))
    assert runner.run(Phase("fg", "foreground", [[*step(wait_for), str(marks / "second")]]))
    assert runner.run(Phase("bad", "background, fails", [step("raise SystemExit(3)")], background=True))
    needs_bad = Phase("needs-bad", "cannot run", [[*step(touch), str(marks / "never")]], after=("bad",), needs=("bad",))
    assert not runner.run(needs_bad)
    assert runner.run(Phase("after-slow", "waits only", [[*step(touch), str(marks / "last")]], after=("slow", "bad")))
    runner.finish()
    results = runner.results
    assert [results[n]["status"] for n in ("slow", "fg", "bad", "needs-bad", "after-slow")] == [
        "passed",
        "passed",
        "failed",
        "failed",
        "passed",
    ]
    assert results["needs-bad"]["error"] == "bad failed" and not (marks / "never").exists()
    assert "exit code 3" in results["bad"]["error"] and (marks / "last").exists()
    assert (tmp_path / "bad.log").is_file()  # a background phase's output goes to its log
    assert all(r["seconds"] >= 0 for r in results.values())
