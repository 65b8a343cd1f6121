"""Batch mode (``parallel``: several requests as sequences of one llama.cpp context) on CUDA, every layer on
the GPU (tests/llamacpp_parallel_reference.py run with ``cuda``): the CPU file's checks, collected here on
the GPU's report, and the text of a lone sequence and of each request served alone is create_completion's."""

from __future__ import annotations

from typing import Any

import pytest

from .cuda_llama import cuda_llama, run_report
from .test_llamacpp_parallel import (  # noqa: F401  (collected here, on the GPU's report)
    test_a_step_decodes_its_sequences_in_ascending_id_order_from_the_lowest_free_ids,
    test_each_request_gets_a_context_of_its_own_size_and_a_lone_one_is_exactly_the_single_loop,
    test_four_requests_advance_together_each_with_its_own_stream,
    text,
)

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return run_report(cuda_llama(), "llamacpp_parallel_reference.py")


def test_batch_mode_on_cuda_gives_create_completions_text(report):
    facts = report["all_facts"]
    assert facts["offloaded_layers"] == facts["offloadable_layers"] > 1, facts
    reference = report["reference"]
    assert len(reference) == len(report["solo"]) == 4 and all(reference)
    assert text(report["alone"]) == reference[0]  # one sequence of the batch
    assert [text(solo) for solo in report["solo"]] == reference  # one at a time, the single loop
