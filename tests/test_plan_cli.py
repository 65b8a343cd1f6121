"""`node-supervisor plan`: the table and the choice per engine, text and JSON.

Two kinds of test.  In-process ones replace the model reader, the GPU probe and
the estimator by the stand-ins of tests/plan_fixtures.py, so they pin what the
command prints.  End-to-end ones run the real command (the real reader, probe
and estimator) on a tiny GGUF written by tests/gguf_writer.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.cli import main

from . import plan_fixtures as fx
from .gguf_writer import write_gguf

CLI = [sys.executable, "-m", "supervisor.cli"]
HEADER = ("variant", "layers", "n_ctx", "cache", "needs GPU MiB", "needs RAM MiB", "free MiB", "fits")


class Stand:
    """Recorded facts, GPUs and the stand-in estimate put in place of the real reader, probe and estimator."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from supervisor.planning.measure.model_facts import ModelFactsError

        self.facts: dict[str, fx.ModelFacts] = {}
        self.snapshot = fx.snapshot(reason="stand-in: no GPU")
        self.error = ModelFactsError
        monkeypatch.setattr("supervisor.planning.measure.inputs.read_model_facts", self._read)
        monkeypatch.setattr("supervisor.planning.measure.gpu.probe", lambda source=None: self.snapshot)
        monkeypatch.setattr("supervisor.planning.decide.estimate.estimate_llamacpp", fx.estimate_llamacpp)
        monkeypatch.setattr("supervisor.planning.decide.estimate.estimate_exl2", fx.estimate_exl2)

    def _read(self, path: Path) -> fx.ModelFacts:
        if str(path) not in self.facts:
            raise self.error(f"{path}: no such file")
        return self.facts[str(path)]


@pytest.fixture
def stand(monkeypatch) -> Stand:
    stand = Stand(monkeypatch)
    for facts in fx.QWEN_3B:
        stand.facts[facts.path] = facts
    return stand


def configure(tmp_path: Path, engines: str, gpu: str = "") -> list[str]:
    path = tmp_path / "config.toml"
    path.write_text(f"[gpu]\n{gpu}\n{engines}")
    return ["--state-dir", str(tmp_path / "state"), "--config", str(path)]


QWEN = '[engines.llama]\nkind = "llamacpp"\nn_ctx = 32768\nn_gpu_layers = "auto"\nmodel = [{}]\n'.format(
    ", ".join(f'"{f.path}"' for f in fx.QWEN_3B)
)


def run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().out


def test_text_on_a_hypothetical_8gb_card_with_a_reserve(stand, tmp_path, capsys):
    code, out = run(capsys, [*configure(tmp_path, QWEN), "plan", "--gpu-memory", "8192", "--reserve", "4096"])
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("GPUs: 0: hypothetical 8192 MiB GPU 8192 MiB (8192 free)")
    header = next(line for line in lines if line.strip().startswith("variant"))
    assert re.split(r"\s{2,}", header.strip()) == list(HEADER)
    rows = lines[lines.index(header) + 1 :]
    assert re.match(
        r"\s+qwen2\.5-3b-instruct-q6_k\.gguf\s+all\s+32768\s+f16\s+\d+\s+\d+\s+4096\s+no: \d+ MiB short", rows[0]
    )
    chosen = next(line for line in lines if line.strip().startswith("chosen:"))
    assert re.search(
        r"chosen: qwen2\.5-3b-instruct-q6_k\.gguf, all layers, n_ctx \d+, f16 KV cache, on GPU 0 because GPU 0 ", chosen
    )
    assert "instead of the requested 32768" in chosen and "- 4096 reserved" in chosen


def test_json_lists_every_candidate_against_what_is_free(stand, tmp_path, capsys):
    code, out = run(
        capsys, [*configure(tmp_path, QWEN, gpu="reserve_mib = 1024"), "plan", "--json", "--gpu-memory", "8192"]
    )
    report = json.loads(out)
    assert code == 0 and report["policy"]["reserve_bytes"] == 1024 * fx.MIB and report["skipped"] == {}
    assert report["gpu"]["devices"][0]["total_bytes"] == 8192 * fx.MIB
    (engine,) = report["engines"]
    assert engine["engine"] == "llama" and engine["device"]["available_bytes"] == 7168 * fx.MIB
    chosen = engine["chosen"]
    assert (chosen["path"], chosen["layers"], chosen["n_ctx"], chosen["device"], chosen["fits"]) == (
        fx.Q6_K.path,
        "all",
        32768,
        0,
        True,
    )
    assert engine["candidates"] == [chosen] and chosen["free_bytes"] == 7168 * fx.MIB
    assert any("as requested" in r for r in engine["reasons"])


def test_without_a_gpu_it_plans_the_cpu_and_says_why(stand, tmp_path, capsys):
    stand.snapshot = fx.snapshot(reason="NVML: NVIDIA driver not loaded")
    code, out = run(capsys, [*configure(tmp_path, QWEN), "plan"])
    assert code == 0
    assert "GPUs: none usable (NVML: NVIDIA driver not loaded): every engine plans for the CPU" in out
    assert "on CPU because CPU: no usable GPU (NVML: NVIDIA driver not loaded)" in out
    assert re.search(r"qwen2\.5-3b-instruct-q6_k\.gguf\s+0\s+32768\s+f16\s+0\s+\d+\s+-\s+yes", out)


def test_unreadable_variants_fake_engines_and_unknown_names(stand, tmp_path, capsys):
    engines = QWEN.replace("model = [", 'model = ["/nowhere/gone.gguf", ') + '[engines.f]\nkind = "fake"\n'
    code, out = run(capsys, [*configure(tmp_path, engines), "plan", "--gpu-memory", "24576"])
    assert code == 0
    assert "warning: variant /nowhere/gone.gguf skipped: /nowhere/gone.gguf: no such file" in out
    assert "engine f: not planned (the fake engine has no model)" in out
    assert main([*configure(tmp_path, engines), "plan", "--engine", "nope"]) == 2
    assert "no engine named 'nope'" in capsys.readouterr().err
    _, only = run(capsys, [*configure(tmp_path, engines), "plan", "--engine", "llama", "--gpu-memory", "24576"])
    assert "engine llama" in only and "engine f" not in only


def test_an_engine_with_nothing_to_run_exits_1(stand, tmp_path, capsys):
    code, out = run(
        capsys, [*configure(tmp_path, '[engines.x]\nkind = "llamacpp"\nmodel = "/nowhere/x.gguf"\n'), "plan"]
    )
    assert code == 1 and "chosen: nothing because no model variant could be read" in out


# --- end to end: the real reader, probe and estimator --------------------------------------


def write_tiny_gguf(path: Path) -> None:
    """A 2-layer Llama (F32, data a hole): enough for the reader (shapes, sizes, metadata)."""
    embd, ffn, heads, kv_heads, vocab = 64, 128, 4, 2, 32
    kv = {
        "llama.block_count": 2,
        "llama.context_length": 2048,
        "llama.embedding_length": embd,
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.rope.dimension_count": embd // heads,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "general.file_type": 0,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(vocab)],
    }
    kv_dim = kv_heads * embd // heads
    shapes = {"token_embd.weight": (embd, vocab), "output_norm.weight": (embd,), "output.weight": (embd, vocab)}
    for i in range(2):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (embd,),
            f"blk.{i}.attn_q.weight": (embd, embd),
            f"blk.{i}.attn_k.weight": (embd, kv_dim),
            f"blk.{i}.attn_v.weight": (embd, kv_dim),
            f"blk.{i}.attn_output.weight": (embd, embd),
            f"blk.{i}.ffn_norm.weight": (embd,),
            f"blk.{i}.ffn_gate.weight": (embd, ffn),
            f"blk.{i}.ffn_up.weight": (embd, ffn),
            f"blk.{i}.ffn_down.weight": (ffn, embd),
        }
    write_gguf(path, "llama", kv, [(name, dims, "F32") for name, dims in shapes.items()])


def real_config(tmp_path: Path) -> list[str]:
    model = tmp_path / "tiny.gguf"
    write_tiny_gguf(model)
    return configure(
        tmp_path, f'[engines.tiny]\nkind = "llamacpp"\nn_ctx = 1024\nn_gpu_layers = "auto"\nmodel = "{model}"\n'
    )


def test_real_plan_json_and_text_on_an_8gb_card(tmp_path):
    argv = [*CLI, *real_config(tmp_path), "plan", "--gpu-memory", "8192"]
    result = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (engine,) = json.loads(result.stdout)["engines"]
    chosen = engine["chosen"]
    assert (Path(chosen["path"]).name, chosen["layers"], chosen["n_ctx"], chosen["device"], chosen["fits"]) == (
        "tiny.gguf",
        "all",
        1024,
        0,
        True,
    )
    assert engine["candidates"][0] == chosen and 0 < chosen["gpu_bytes"] < 8192 * fx.MIB
    text = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert all(column in text.stdout for column in HEADER)
    assert re.search(r"tiny\.gguf\s+all\s+1024\s+f16\s+\d+\s+\d+\s+8192\s+yes", text.stdout)
    assert "chosen: tiny.gguf, all layers, n_ctx 1024, f16 KV cache, on GPU 0 because" in text.stdout


def test_real_plan_without_a_gpu_plans_the_cpu_and_says_why(tmp_path):
    from supervisor.planning.measure.gpu import probe

    found = probe()
    if found.devices:
        pytest.skip("this machine has a GPU")
    result = subprocess.run([*CLI, *real_config(tmp_path), "plan"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"GPUs: none usable ({found.reason})" in result.stdout
    assert f"on CPU because CPU: no usable GPU ({found.reason})" in result.stdout
