"""The llama.cpp worker's loop on the C API against llama-cpp-python's own
create_completion, in the llama.cpp environment on the default model
(tests/llamacpp_reference.py runs both there and reports)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.node.envs import env_python

from .conftest import REPO

pytestmark = pytest.mark.real_engine

IN_FORCE = ("n_threads", "n_threads_batch", "n_batch", "n_ubatch", "flash_attn")


@pytest.fixture(scope="module")
def report(shared_state: dict[str, Path]) -> dict[str, Any]:
    script = REPO / "tests" / "llamacpp_reference.py"
    proc = subprocess.run(
        [str(env_python(shared_state["envs_dir"] / "llamacpp")), str(script), str(REPO), str(shared_state["model"])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_greedy_and_seeded_texts_and_token_counts_are_create_completions(report):
    """Greedy and seeded sampling give what llama-cpp-python gives, text and token counts,
    with a one-byte piece buffer too (pieces longer than the buffer are fetched again)."""
    for case in report["cases"]:
        ours, reference = case["ours"], case["reference"]
        assert {k: ours[k] for k in reference} == reference, case["case"]
        assert case["small_buffer"] == ours, case["case"]
        assert ours["tokens_sent"] == ours["completion_tokens"] > 0  # every token's text was sent, counted once
    assert any(c["case"]["temperature"] > 0 for c in report["cases"])
    assert any(not c["ours"]["text"].isascii() for c in report["cases"])  # multi-byte characters came through whole


def test_a_prompt_is_evaluated_from_where_it_differs_from_what_the_context_holds(report):
    first, longer, again = (case["ours"] for case in report["cases"][:3])
    assert first["prompt_evaluated"] == first["prompt_tokens"]  # a fresh context
    assert (
        longer["prompt_evaluated"] == longer["prompt_tokens"] - first["prompt_tokens"]
    )  # it starts with the first prompt
    assert again["prompt_evaluated"] == 1  # all held: only the last token again, for its logits


def test_cancelling_between_tokens_ends_with_the_tokens_so_far(report):
    cancelled, full = report["cancelled"], report["cases"][0]["ours"]
    assert cancelled["finish"] == "cancelled"
    assert cancelled["completion_tokens"] == cancelled["tokens_sent"] == 5  # should_stop said yes before the sixth
    assert full["text"].startswith(cancelled["text"]) and len(cancelled["text"]) < len(full["text"])


def test_a_stop_string_ends_the_text_before_it(report):
    ours, reference = report["stopped"]["ours"], report["stopped"]["reference"]
    assert ours["finish"] == "stop" and ours["text"] == reference["text"]
    assert "country of" not in ours["text"] and report["cases"][0]["ours"]["text"].startswith(
        ours["text"] + "country of"
    )
    assert ours["tokens_sent"] < ours["completion_tokens"]  # the stop string's tokens were generated, never sent


def test_ignore_eos_chains_never_pick_an_end_of_generation_token(report):
    picks = report["eog_picks"]
    eog = set(picks["eog"])
    assert (
        eog and all(p in eog for p in picks["greedy"]) and any(p in eog for p in picks["sampled"])
    )  # they lead without the ban
    assert not eog & set(picks["greedy_ignore_eos"] + picks["sampled_ignore_eos"])


def test_settings_in_force_default_to_the_physical_cores_and_cpu_batches(report):
    defaults = {k: report["defaults"][k] for k in IN_FORCE}
    every_cpu = len(os.sched_getaffinity(0)) == os.cpu_count() if hasattr(os, "sched_getaffinity") else True
    cores = psutil.cpu_count(logical=False) if every_cpu else report["physical_cores"]
    assert defaults == {
        "n_threads": cores,
        "n_threads_batch": cores,
        "n_batch": 512,
        "n_ubatch": 512,
        "flash_attn": False,
    }


def test_explicit_settings_are_what_llama_cpp_runs_with(report):
    explicit = {k: report["explicit"][k] for k in IN_FORCE}
    assert explicit == {"n_threads": 1, "n_threads_batch": 2, "n_batch": 256, "n_ubatch": 128, "flash_attn": True}


def test_penalties_change_the_text_of_a_repetitive_prompt_and_a_seed_reproduces_it(report):
    """Each penalty, greedy or sampled, moves the model off a loop it otherwise repeats to the end;
    the same seed gives the same text; penalty_last_n 0 turns them off."""
    penalties = report["penalties"]
    greedy, seeded = penalties["greedy"], penalties["seeded"]
    assert greedy["none"].split() == ["one", "two", "three"] * 8  # without penalties, the loop
    for name in ("repeat_penalty", "presence_penalty", "frequency_penalty"):
        assert greedy[name] != greedy["none"], name
        first, again = seeded[name]
        assert first == again and first != seeded["none"][0], name
    assert greedy["repeat_penalty_last_0"] == greedy["none"] and seeded["repeat_penalty_last_0"] == seeded["none"]


def test_logit_bias_and_min_p_shape_the_choice(report):
    """A bias of +100 on a token makes greedy pick it; min_p 1 keeps only the top token, whatever the seed;
    a token id the vocabulary does not have is the request's error, naming the field."""
    penalties = report["penalties"]
    assert penalties["biased"].startswith(penalties["biased_token"] * 3)
    assert penalties["min_p_1"] == [penalties["greedy"]["none"]] * 2
    code, message = penalties["out_of_vocabulary"]
    assert code == "invalid_request" and message.startswith("logit_bias[262144]: not a token")
