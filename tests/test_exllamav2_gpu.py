"""ExLlamaV2 on a GPU: load an EXL2 model directory, stream, cancel.

These need an NVIDIA GPU with CUDA in the exllamav2 environment, and an EXL2
model directory in NODESUP_EXL2_MODEL_DIR (none ships as a package).  They
drive the real engine module in that environment's interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from supervisor.envs import worker_environ

from .conftest import shared_settings

pytestmark = [pytest.mark.cuda, pytest.mark.real_engine]

SCRIPT = r"""
import json, sys
from workers.engine import GenerateRequest, load_engine
engine = load_engine("exllamav2")
progress = []
facts = engine.load({"model": sys.argv[1], "n_ctx": 2048, "options": {"cache_type": sys.argv[2]}}, lambda f, m: progress.append(f))
out = []
result = engine.generate(GenerateRequest("a", prompt="Once upon a time", max_tokens=32, temperature=0.0, seed=1), out.append, lambda: False)
cancel_after = 5
pieces = []
cancelled = engine.generate(GenerateRequest("b", prompt="Once upon a time", max_tokens=400, ignore_eos=True), pieces.append, lambda: len(pieces) >= cancel_after)
print(json.dumps({"facts": facts, "progress": progress, "text": "".join(out), "finish": result.finish_reason,
                  "tokens": result.completion_tokens, "cancel_finish": cancelled.finish_reason,
                  "pieces_after_cancel": len(pieces) - cancel_after, "cancel_tokens": cancelled.completion_tokens}))
"""


def exl2_python() -> Path:
    return shared_settings().envs_dir / "exllamav2" / "bin" / "python"


def cuda_available() -> bool:
    if not exl2_python().exists():
        return False
    result = subprocess.run([str(exl2_python()), "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
    return result.stdout.strip() == "True"


requires_gpu = pytest.mark.skipif(not cuda_available(), reason="needs an NVIDIA GPU with CUDA: torch in the exllamav2 environment sees none")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    value = os.environ.get("NODESUP_EXL2_MODEL_DIR")
    if not value:
        pytest.skip("needs an EXL2 model directory in NODESUP_EXL2_MODEL_DIR (no EXL2 model ships as a package)")
    return Path(value)


def run_engine(model_dir: Path, cache_type: str) -> dict:
    result = subprocess.run(
        [str(exl2_python()), "-c", SCRIPT, str(model_dir), cache_type],
        capture_output=True, text=True, env=worker_environ(shared_settings()), timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@requires_gpu
@pytest.mark.parametrize("cache_type", ["fp16", "q4"])
def test_load_stream_and_cancel(model_dir, cache_type):
    out = run_engine(model_dir, cache_type)
    assert out["facts"]["cache_type"] == cache_type and out["facts"]["n_ctx"] == 2048
    assert out["progress"] and out["progress"][-1] == pytest.approx(1.0)
    assert out["text"].strip() and out["finish"] in ("stop", "length") and 0 < out["tokens"] <= 32
    assert out["cancel_finish"] == "cancelled"
    assert out["pieces_after_cancel"] <= 2 and out["cancel_tokens"] < 400
