"""Run in the llama.cpp environment by tests/test_llamacpp_parallel.py: the
worker's engine serving requests one at a time, then the same requests as
sequences of one context (``parallel``); prints a JSON report.

    python llamacpp_parallel_reference.py REPO MODEL [cuda]

With ``cuda`` (tests/test_cuda_llamacpp_parallel.py) every layer is on the
GPU, and the report adds create_completion's text for each prompt, computed
with the settings the engine has in force.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

sys.path.insert(0, sys.argv[1])

from workers.protocol.messages import Generate, LoadSpec  # noqa: E402
from workers.llamacpp.engine import create_engine  # noqa: E402

MODEL = sys.argv[2]
CUDA = sys.argv[3:4] == ["cuda"]
SPEC = LoadSpec(model=MODEL, n_ctx=512, n_threads=2, n_gpu_layers=-1 if CUDA else 0)
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def fibonacci(n):"]
MAX_TOKENS = 20


def request(i: int, **fields: object) -> Generate:
    return Generate.of(f"r{i}", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS, temperature=0.0, **fields)


def one_at_a_time() -> list[dict[str, object]]:
    engine = create_engine()
    engine.load(SPEC, lambda *_: None)
    out = []
    for i in range(len(PROMPTS)):
        pieces: list[tuple[str, int]] = []
        result = engine.generate(request(i), lambda text, tokens=1: pieces.append((text, tokens)), lambda: False)
        out.append({"pieces": pieces, "completion_tokens": result.completion_tokens, "finish": result.finish_reason})
    return out


def together(
    engine: object, requests: list[Generate], cancel_after: dict[str, int]
) -> tuple[dict[str, dict[str, object]], int]:
    """Run ``requests`` as sequences, all begun before the first step; cancel some after n steps."""
    pieces: dict[str, list[tuple[str, int]]] = {}
    for r in requests:
        pieces[r.request_id] = []
        engine.begin(r, lambda text, tokens=1, rid=r.request_id: pieces[rid].append((text, tokens)))  # type: ignore[attr-defined]
    ended: dict[str, dict[str, object]] = {}
    steps = 0
    while len(ended) < len(requests):
        steps += 1
        results = list(engine.step())  # type: ignore[attr-defined]
        results += [(rid, engine.end(rid)) for rid, n in cancel_after.items() if n == steps and rid not in ended]  # type: ignore[attr-defined]
        for rid, result in results:
            ended[rid] = {
                "pieces": pieces[rid],
                "completion_tokens": result.completion_tokens,
                "finish": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
            }
    return ended, steps


def batch_order(engine: object) -> dict[str, object]:
    """Sequence ids after a request ended out of order, and the ids of a generating step's batch, in batch order."""
    sequences = engine._batch  # type: ignore[attr-defined]
    for i in range(3):
        engine.begin(request(i), lambda *_: None)  # type: ignore[attr-defined]
    engine.step()  # type: ignore[attr-defined]  # prompts read: all three generate from here
    engine.end("r0")  # type: ignore[attr-defined]  # its sequence id is free again
    engine.begin(request(3), lambda *_: None)  # type: ignore[attr-defined]
    engine.step()  # type: ignore[attr-defined]  # r3's prompt read
    ids = {rid: seq.seq_id for rid, seq in sequences._running.items()}
    count = sequences._fill()
    in_batch = [sequences._batch.seq_id[i][0] for i in range(count)]
    for rid in list(ids):
        engine.end(rid)  # type: ignore[attr-defined]
    return {"ids": ids, "generating_step": in_batch}


def create_completion_texts(facts: dict[str, object]) -> list[str]:
    """llama-cpp-python's own create_completion for each prompt, computing as the engine does."""
    import llama_cpp

    settings = {key: facts[key] for key in ("n_batch", "n_ubatch", "flash_attn")}
    llm = llama_cpp.Llama(MODEL, n_ctx=512, n_threads=2, n_gpu_layers=SPEC.n_gpu_layers, verbose=False, **settings)
    texts = [llm.create_completion(p, max_tokens=MAX_TOKENS, temperature=0.0)["choices"][0]["text"] for p in PROMPTS]
    llm.close()
    return texts


def main() -> None:
    solo = one_at_a_time()
    engine = create_engine()
    facts = engine.load(replace(SPEC, parallel=4), lambda *_: None)
    alone, _ = together(engine, [request(0)], {})
    four, steps = together(engine, [request(i) for i in range(4)], {})
    # Slots are reused: more requests than slots, one cancelled, one ending at a stop string.
    again, _ = together(engine, [request(1), request(2, stop=["7,"]), request(3)], {"r3": 5})
    order = batch_order(engine)
    # Each sequence samples with its own chain: a grammar, a penalty and plain greedy side by side.
    mixed, _ = together(
        engine,
        [request(0, grammar='root ::= "yes" | "no"'), request(2, repeat_penalty=2.0, penalty_last_n=-1), request(1)],
        {},
    )
    print(
        json.dumps(
            {
                "solo": solo,
                "order": order,
                "facts": {k: facts[k] for k in ("n_ctx", "parallel")},
                "slots": engine.slots,
                "alone": alone["r0"],
                "four": [four[f"r{i}"] for i in range(4)],
                "four_steps": steps,
                "again": again,
                "mixed": mixed,
                **({"reference": create_completion_texts(facts), "all_facts": facts} if CUDA else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
