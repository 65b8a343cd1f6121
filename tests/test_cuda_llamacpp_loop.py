"""The llama.cpp worker's C-API token loop on CUDA, every layer on the GPU, against llama-cpp-python's own
create_completion computing as the engine does (tests/llamacpp_reference.py run with ``cuda``).

The content-free checks are the CPU file's own (tests/test_llamacpp_loop.py), collected here on the GPU's
report; the GPU check's model has random weights, so the stop string comes from the text itself."""

from __future__ import annotations

from typing import Any

import pytest

from .cuda_llama import cuda_llama, run_report
from .test_llamacpp_loop import (  # noqa: F401  (collected here, on the GPU's report)
    test_a_prompt_is_evaluated_from_where_it_differs_from_what_the_context_holds,
    test_cancelling_between_tokens_ends_with_the_tokens_so_far,
    test_explicit_settings_are_what_llama_cpp_runs_with,
    test_ignore_eos_chains_never_pick_an_end_of_generation_token,
)

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return run_report(cuda_llama(), "llamacpp_reference.py")


def test_every_layer_is_offloaded_to_the_gpu(report):
    facts = report["facts"]
    assert facts["gpu_offload"] is True and facts["n_gpu_layers"] == -1
    assert facts["offloaded_layers"] == facts["offloadable_layers"] > 1, facts


def test_greedy_and_seeded_texts_and_token_counts_on_cuda_are_create_completions(report):
    for case in report["cases"]:
        ours, reference = case["ours"], case["reference"]
        assert {k: ours[k] for k in reference} == reference, case["case"]
        assert case["small_buffer"] == ours, case["case"]  # the one-byte piece buffer: the same pieces
        assert ours["tokens_sent"] == ours["completion_tokens"] > 0
    assert any(c["case"]["temperature"] > 0 for c in report["cases"])


def test_a_stop_string_ends_the_text_before_it_as_in_create_completion(report):
    stopped, full = report["stopped"], report["cases"][0]["ours"]["text"]
    stop, ours = stopped["stop"], stopped["ours"]
    assert stop, f"no four-character stop string in the second half of {full!r}"
    assert ours["finish"] == stopped["reference"]["finish"] == "stop"
    assert ours["text"] == stopped["reference"]["text"] == full[: full.index(stop)]


def test_gpu_defaults_are_the_gpu_batch_and_flash_attention_on(report):
    """With layers on the GPU the worker asks llama.cpp for a 2048-token batch and flash attention "auto",
    which llama.cpp turns on where the GPU supports it (every CUDA GPU it builds for)."""
    defaults = report["defaults"]
    assert (defaults["n_batch"], defaults["n_ubatch"], defaults["flash_attn"]) == (2048, 512, True), defaults
