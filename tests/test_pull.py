"""Models users can get: `node-supervisor pull REPO[:QUANT|FILE]` through huggingface_hub from a local
stand-in for the Hub (tests/fake_hub.py, through HF_ENDPOINT; never the real Hub), and chat refused
on a model without a chat template."""

from __future__ import annotations

import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

from supervisor.config import load_settings

from .conftest import CLI, collect
from .fake_hub import FakeHub, Repo

REPO = "someone/Tiny-Instruct-GGUF"


def model_bytes(seed: int, size: int = 3 << 20) -> bytes:
    """A GGUF header (version 3, one tensor, one metadata key: what models_dir's scan reads), then filler."""
    return b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + random.Random(seed).randbytes(size)


@pytest.fixture
def hub():
    files = {
        "tiny-instruct-Q8_0.gguf": model_bytes(1, 1 << 20),
        "tiny-instruct-Q4_K_M.gguf": model_bytes(2),
        "README.md": b"# tiny\n",
    }
    fake = FakeHub({REPO: Repo(files), "someone/private-GGUF": Repo({"p-Q4_K_M.gguf": model_bytes(3)}, "secret")})
    yield fake
    fake.close()


def pull(hub: FakeHub, tmp_path: Path, spec: str, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NODESUP_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), **environ)
    return subprocess.run(
        [*CLI, "--data-dir", str(tmp_path / "data"), "--state-dir", str(tmp_path / "s"), "pull", spec],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_pull_downloads_the_named_quantization_into_the_models_directory(hub, tmp_path):
    result = pull(hub, tmp_path, f"{REPO}:q4_k_m")
    assert result.returncode == 0, result.stderr
    target = tmp_path / "data" / "models" / "tiny-instruct-Q4_K_M.gguf"
    assert target.read_bytes() == hub.repos[REPO].files["tiny-instruct-Q4_K_M.gguf"]
    assert "SHA-256" in result.stdout and "checked" in result.stdout and "tiny-instruct-Q4_K_M" in result.stdout
    assert not (tmp_path / "data" / "models" / "tiny-instruct-Q8_0.gguf").exists()
    # Usable by name: the models directory makes the file an engine (issue 18's models_dir), as pull says.
    engines = load_settings(None, {"data_dir": tmp_path / "data"}).engines
    assert engines["tiny-instruct-Q4_K_M"].model == target and engines["tiny-instruct-Q4_K_M"].kind == "llamacpp"
    assert "generate --engine tiny-instruct-Q4_K_M" in result.stdout
    by_file = pull(hub, tmp_path, f"{REPO}:tiny-instruct-Q8_0.gguf")
    assert by_file.returncode == 0 and (tmp_path / "data" / "models" / "tiny-instruct-Q8_0.gguf").is_file()


def test_an_interrupted_download_resumes_where_it_stopped(hub, tmp_path):
    # Larger than huggingface_hub's 10 MiB download chunk, cut after one chunk has been written.
    hub.repos[REPO].files["tiny-instruct-Q4_K_M.gguf"] = model_bytes(4, 16 << 20)
    hub.repos[REPO].drop_after["tiny-instruct-Q4_K_M.gguf"] = 12 << 20
    result = pull(hub, tmp_path, REPO)  # no quantization named: Q4_K_M, the usual default
    if result.returncode != 0:  # the connection dropped: the same pull again resumes
        assert "Traceback" not in result.stderr and "run the same pull again" in result.stderr, result.stderr
        result = pull(hub, tmp_path, REPO)
    assert result.returncode == 0, result.stderr
    target = tmp_path / "data" / "models" / "tiny-instruct-Q4_K_M.gguf"
    assert target.read_bytes() == hub.repos[REPO].files["tiny-instruct-Q4_K_M.gguf"]
    resumed = [r for r in hub.ranges if r.startswith("bytes=") and not r.startswith("bytes=0-")]
    assert resumed, hub.ranges  # the rest was asked for, not the whole file again


def test_a_file_whose_checksum_differs_is_refused_and_removed(hub, tmp_path):
    listed = hub.repos[REPO].files["tiny-instruct-Q4_K_M.gguf"]
    hub.repos[REPO].served["tiny-instruct-Q4_K_M.gguf"] = listed[:-1] + bytes([listed[-1] ^ 1])
    result = pull(hub, tmp_path, f"{REPO}:Q4_K_M")
    assert result.returncode == 65 and "SHA-256" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "data" / "models" / "tiny-instruct-Q4_K_M.gguf").exists()


def test_a_private_repository_needs_hf_token(hub, tmp_path):
    refused = pull(hub, tmp_path, "someone/private-GGUF")
    assert refused.returncode == 66 and "HF_TOKEN" in refused.stderr and "Traceback" not in refused.stderr
    allowed = pull(hub, tmp_path, "someone/private-GGUF", HF_TOKEN="secret")
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "data" / "models" / "p-Q4_K_M.gguf").is_file()


def test_offline_mode_and_unknown_choices_say_so_in_one_line(hub, tmp_path):
    offline = pull(hub, tmp_path, REPO, HF_HUB_OFFLINE="1")
    assert offline.returncode == 69 and "offline mode is on" in offline.stderr, offline.stderr
    missing = pull(hub, tmp_path, f"{REPO}:Q2_K")
    assert missing.returncode == 66 and "tiny-instruct-Q4_K_M.gguf" in missing.stderr, missing.stderr
    for result in (offline, missing):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.real_engine
def test_chat_on_a_model_without_a_chat_template_is_refused_with_a_clear_message(make_daemon):
    """The default Gemma 3 270M package is a base model: no template, so no junk answers to chat."""
    daemon = make_daemon({"llama": {"kind": "llamacpp", "n_ctx": 2048, "n_threads": 2}})
    _, end = collect(daemon.client().generate(messages=[{"role": "user", "content": "Hello"}], max_tokens=8))
    assert end["event"] == "error" and end["code"] == "invalid_request", end
    assert "gemma-3-270m-q4_k_m.gguf has no chat template" in end["message"] and "pull" in end["message"]
    _, done = collect(daemon.client().generate(prompt="The capital of France is", max_tokens=4))
    assert done["event"] == "done"  # completion, what a base model does
    command = [*CLI, "--config", str(daemon.config_path), "generate", "Hello", "--chat", "--max-tokens", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no chat template" in result.stderr, result
