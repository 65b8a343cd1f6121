"""ExLlamaV2 on a GPU: load an EXL2 model, stream, stop, cancel, chat.

These need an NVIDIA GPU that torch in the exllamav2 environment can see,
and an EXL2 model directory in NODESUP_EXL2_MODEL_DIR (no EXL2 model ships
as a package).  The interpreter is NODESUP_EXL2_PYTHON, else the test
state's exllamav2 environment (`make test` creates it).

The test process has no torch: a script run by that interpreter drives the
real engine module through ``workers.engine.load_engine("exllamav2")`` and
writes what happened to a JSON file; the tests assert on it.  (Not stdout:
exllamav2 prints there, e.g. while it JIT-compiles its extension.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from .conftest import checkout_worker_environ, shared_settings

pytestmark = pytest.mark.cuda

NO_CUDA = "needs an NVIDIA GPU with CUDA: torch in the exllamav2 environment sees none"
N_CTX = 1024
CANCEL_AFTER = 5  # pieces emitted before should_stop() turns true

SCRIPT = r"""
import json, sys
from workers.engine import ModelError, RequestError, load_engine
from workers.protocol.messages import Generate, LoadSpec

model_dir, cache_type, out_path = sys.argv[1:4]
out = {}

def run(engine, **fields):
    pieces = []
    try:
        r = engine.generate(Generate.of("t", **fields), pieces.append, lambda: False)
    except RequestError as exc:
        return {"error": exc.code, "message": exc.message}
    return {"text": "".join(pieces), "pieces": len(pieces), "finish": r.finish_reason,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}

for name, spec in {"missing": {"model": model_dir + "/does-not-exist"},
                   "bad_cache": {"model": model_dir, "options": {"cache_type": "q5"}}}.items():
    try:
        load_engine("exllamav2").load(LoadSpec(**spec), lambda f, m: None)
        out[name] = None
    except ModelError as exc:
        out[name] = exc.code

engine = load_engine("exllamav2")
out["versions"] = engine.versions()
progress = []
out["facts"] = engine.load(LoadSpec(model=model_dir, n_ctx=N_CTX, options={"cache_type": cache_type}),
                           lambda f, m: progress.append(f))
out["progress"] = progress

prompt = "The history of the city began"
out["greedy"] = run(engine, prompt=prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
out["greedy_again"] = run(engine, prompt=prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
text = out["greedy"].get("text", "")
# A stop string from the second half of that text: the same greedy run must end just before it.
stop = next((text[k:k + 4] for k in range(len(text) // 2, len(text) - 3) if text[k:k + 4].strip()), None)
out["stop_string"] = stop
out["stopped"] = run(engine, prompt=prompt, max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]) if stop else None
out["sampled"] = run(engine, prompt=prompt, max_tokens=8, temperature=0.8, top_p=0.9, top_k=40, seed=3, ignore_eos=True)

pieces, flipped_at = [], []
def should_stop():
    if len(pieces) >= CANCEL_AFTER and not flipped_at:
        flipped_at.append(len(pieces))
    return bool(flipped_at)
r = engine.generate(Generate.of("c", prompt=prompt, max_tokens=400, ignore_eos=True), pieces.append, should_stop)
out["cancel"] = {"finish": r.finish_reason, "completion_tokens": r.completion_tokens,
                 "pieces_after_stop": len(pieces) - flipped_at[0]}
out["after_cancel"] = run(engine, prompt=prompt, max_tokens=24, temperature=0.0, ignore_eos=True)

out["chat"] = run(engine, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0.0)
out["overflow"] = run(engine, prompt="word " * (2 * N_CTX), max_tokens=4)
with open(out_path, "w") as f:
    json.dump(out, f)
""".replace("N_CTX", str(N_CTX)).replace("CANCEL_AFTER", str(CANCEL_AFTER))


worker_env = checkout_worker_environ


@lru_cache(maxsize=1)
def exl2_python() -> str:
    """The exllamav2 environment's interpreter, once it is known to see a GPU; else skip."""
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidiactl").exists():
        pytest.skip(f"{NO_CUDA} (this machine has no NVIDIA driver)")
    override = os.environ.get("NODESUP_EXL2_PYTHON")
    python = Path(override) if override else shared_settings().envs_dir / "exllamav2" / "bin" / "python"
    if not python.exists():
        if override:
            pytest.fail(f"NODESUP_EXL2_PYTHON={override} does not exist")
        pytest.fail(f"no exllamav2 environment at {python}: run `make test` or set NODESUP_EXL2_PYTHON")
    probe = subprocess.run(
        [str(python), "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=120,
    )
    assert probe.returncode == 0, f"{python} cannot import torch:\n{probe.stderr[-2000:]}"
    if probe.stdout.strip() != "True":
        pytest.skip(NO_CUDA)
    return str(python)


def model_dir() -> str:
    value = os.environ.get("NODESUP_EXL2_MODEL_DIR")
    if not value:
        pytest.skip("needs an EXL2 model directory in NODESUP_EXL2_MODEL_DIR (no EXL2 model ships as a package)")
    if not (Path(value) / "config.json").is_file():
        pytest.fail(f"NODESUP_EXL2_MODEL_DIR={value} is not an EXL2 model directory (no config.json)")
    return value


@pytest.fixture(scope="module", params=["fp16", "q4"])
def run(request: pytest.FixtureRequest) -> dict[str, Any]:
    """One engine session per cache type: load, then every request the tests look at."""
    python, model = exl2_python(), model_dir()
    with tempfile.TemporaryDirectory(prefix="exl2-") as tmp:
        out_path = Path(tmp) / "out.json"
        # The first import JIT-compiles exllamav2's CUDA extension: minutes.
        result = subprocess.run(
            [python, "-c", SCRIPT, model, request.param, str(out_path)],
            capture_output=True,
            text=True,
            env=worker_env(),
            timeout=1800,
        )
        assert result.returncode == 0, f"engine script failed:\n{result.stderr[-4000:]}"
        out = json.loads(out_path.read_text())
    out["cache_type"] = request.param
    return out


@pytest.mark.timeout(1800)
def test_load_reports_facts_versions_and_progress(run):
    facts = run["facts"]
    assert facts["cache_type"] == run["cache_type"] and facts["n_ctx"] == N_CTX
    assert facts["model"] == str(Path(os.environ["NODESUP_EXL2_MODEL_DIR"])) and facts["model_name"]
    assert run["versions"]["exllamav2"] == "0.3.2" and run["versions"]["cuda_available"] is True
    assert run["versions"]["numpy"] == "1.26.4" and run["versions"]["torch"].startswith("2.13.0")
    progress = run["progress"]
    assert progress[0] == 0.0 and progress[-1] == 1.0 and len(progress) >= 3
    assert progress == sorted(progress), "load progress never goes backwards"


@pytest.mark.timeout(1800)
def test_model_errors_say_missing_or_unloadable(run):
    assert run["missing"] == "model_not_found"
    assert run["bad_cache"] == "model_load_failed"


@pytest.mark.timeout(1800)
def test_greedy_stream_is_text_exact_length_and_repeatable(run):
    greedy = run["greedy"]
    assert greedy["text"].strip() and greedy["pieces"] >= 2
    assert greedy["finish"] == "length" and greedy["completion_tokens"] == 24 and greedy["prompt_tokens"] > 1
    assert run["greedy_again"]["text"] == greedy["text"], "temperature 0 is greedy, so deterministic"
    sampled = run["sampled"]
    assert sampled["text"] and sampled["finish"] == "length" and sampled["completion_tokens"] == 8


@pytest.mark.timeout(1800)
def test_a_stop_string_ends_the_stream_before_it(run):
    text, stop, stopped = run["greedy"]["text"], run["stop_string"], run["stopped"]
    assert stop, f"no 4-character stop string to take from {text!r}"
    assert stopped["finish"] == "stop"
    assert stopped["text"] == text[: text.index(stop)], "the text up to the stop string, without it"
    assert stopped["completion_tokens"] < 24


@pytest.mark.timeout(1800)
def test_cancel_stops_within_two_tokens_and_leaves_the_engine_usable(run):
    cancel = run["cancel"]
    assert cancel["finish"] == "cancelled"
    assert cancel["pieces_after_stop"] <= 2
    assert CANCEL_AFTER <= cancel["completion_tokens"] <= CANCEL_AFTER + 8  # held-back text aside, far from 400
    assert run["after_cancel"]["text"] == run["greedy"]["text"], "the cancelled job left nothing behind"


@pytest.mark.timeout(1800)
def test_chat_uses_the_model_template_or_refuses_and_overflow_is_refused(run):
    chat = run["chat"]
    has_template = run["facts"]["chat_template"]
    if has_template:
        assert "error" not in chat and chat["text"].strip() and chat["finish"] in ("stop", "length")
    else:
        assert chat["error"] == "invalid_request" and "chat template" in chat["message"]
    assert run["overflow"]["error"] == "context_overflow"
