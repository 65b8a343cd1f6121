"""The worker's llama.cpp engine next to llama-cpp-python's own create_completion, as JSON.

Run by tests/test_llamacpp_loop.py with the llama.cpp environment's
interpreter (the daemon's cannot import llama_cpp):

    python tests/llamacpp_reference.py REPO MODEL [cuda]

With ``cuda`` (tests/test_cuda_llamacpp_loop.py) both sides put every layer
on the GPU and create_completion gets the settings the engine has in force
there (batch sizes, flash attention), and the stop string is taken from the
first case's text (the GPU check's model has random weights).

Prints one JSON object: the engine's facts with its default settings and
with explicit ones; for each case, what the engine produced (twice: once with
a piece buffer of one byte, so that nearly every piece takes the long-piece
path), what create_completion produced, and how many prompt tokens the engine
evaluated; a cancelled and a stopped run; and what the engine's sampler
chains pick when end-of-generation tokens have the highest logits (the
default model all but never ends a text by itself, so ignore_eos is checked
on the chain).
"""

from __future__ import annotations

import ctypes
import json
import sys
from typing import Any

REPO, MODEL = sys.argv[1], sys.argv[2]
CUDA = sys.argv[3:4] == ["cuda"]
LAYERS = -1 if CUDA else 0
sys.path.insert(0, REPO)

import llama_cpp  # noqa: E402

from workers.llamacpp import loop as llamacpp_loop  # noqa: E402
from workers.engine import RequestError  # noqa: E402
from workers.protocol.messages import Generate, LoadSpec, Sampling  # noqa: E402
from workers.llamacpp.engine import create_engine  # noqa: E402
from workers.llamacpp.loop import TokenLoop  # noqa: E402
from workers.llamacpp.settings import physical_cores  # noqa: E402

# In this order: later prompts share beginnings with earlier ones, so both
# sides reuse what their context holds, as a served sequence of requests does.
CASES = [
    {"prompt": "The capital of France is", "max_tokens": 32, "temperature": 0.0, "seed": 1},
    {
        "prompt": "The capital of France is Paris. The capital of Germany is",
        "max_tokens": 32,
        "temperature": 0.0,
        "seed": 1,
    },
    {"prompt": "The capital of France is", "max_tokens": 32, "temperature": 0.0, "seed": 1},
    {"prompt": "Écris une phrase sur les élèves et l'été :", "max_tokens": 24, "temperature": 0.0, "seed": 1},
    {"prompt": "日本の首都は", "max_tokens": 24, "temperature": 0.0, "seed": 1},
    {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.8, "top_p": 0.95, "top_k": 40, "seed": 42},
]
THREADS = {
    "n_threads": 1,
    "n_threads_batch": 1,
}  # the compared runs: one thread computes as fast here and leaves a core to others

decoded: list[int] = []  # tokens per llama_decode call
sampled_after: list[int] = []  # tokens decoded before each sampling
_decode, _sample = llama_cpp.llama_decode, llama_cpp.llama_sampler_sample


def counting_decode(ctx: Any, batch: Any) -> int:
    decoded.append(batch.n_tokens)
    return _decode(ctx, batch)


def counting_sample(chain: Any, ctx: Any, index: int) -> int:
    sampled_after.append(sum(decoded))
    return _sample(chain, ctx, index)


# The engine's loop calls the module's functions.
llama_cpp.llama_decode, llama_cpp.llama_sampler_sample = counting_decode, counting_sample


def load(**spec: Any) -> tuple[Any, dict[str, Any]]:
    engine = create_engine()
    facts = engine.load(LoadSpec(model=MODEL, n_ctx=2048, n_gpu_layers=LAYERS, **spec), lambda fraction, message: None)
    return engine, facts


def ours(engine: Any, stop_after: int | None = None, **params: Any) -> dict[str, Any]:
    """One request; ``stop_after``: should_stop() says yes at its call after that many tokens."""
    pieces: list[str] = []
    sent = [0]
    calls = [0]

    def emit(text: str, tokens: int = 1) -> None:
        pieces.append(text)
        sent[0] += tokens

    def should_stop() -> bool:
        calls[0] += 1
        return stop_after is not None and calls[0] > stop_after

    decoded.clear()
    sampled_after.clear()
    result = engine.generate(Generate.of("r", **params), emit, should_stop)
    return {
        "text": "".join(pieces),
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish": result.finish_reason,
        "tokens_sent": sent[0],
        "prompt_evaluated": sampled_after[0],
    }


def reference(llm: Any, prompt: str, **params: Any) -> dict[str, Any]:
    out = llm.create_completion(prompt, **params)
    choice = out["choices"][0]
    return {
        "text": choice["text"],
        "prompt_tokens": out["usage"]["prompt_tokens"],
        "completion_tokens": out["usage"]["completion_tokens"],
        "finish": choice["finish_reason"],
    }


def eog_picks(llm: Any, loop: TokenLoop) -> dict[str, list[int]]:
    """The token each sampler chain picks among candidates whose highest logits are end-of-generation tokens."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog = [token for token in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, token)]
    candidates = [(token, 10.0) for token in eog] + [(1000, 5.0), (2000, 4.0)]
    picks: dict[str, list[int]] = {}
    for name, temperature, ban_eog in (
        ("greedy", 0.0, False),
        ("greedy_ignore_eos", 0.0, True),
        ("sampled", 1.0, False),
        ("sampled_ignore_eos", 1.0, True),
    ):
        picks[name] = []
        for seed in range(8):
            data = (llama_cpp.llama_token_data * len(candidates))(
                *(llama_cpp.llama_token_data(t, logit, 0.0) for t, logit in candidates)
            )
            array = llama_cpp.llama_token_data_array(data, len(candidates), -1, False)
            chain = loop.sampler(Sampling(temperature=temperature, top_p=1.0, top_k=0, ignore_eos=ban_eog), seed, [])
            llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
            loop.free(chain)
            picks[name].append(data[array.selected].id)
    picks["eog"] = eog
    return picks


def same_settings(facts: dict[str, Any]) -> dict[str, Any]:
    """create_completion's Llama computing as the engine does: on the CPU, its defaults (the engine's too);
    on the GPU, every layer there, with the engine's batch sizes and flash attention as in force."""
    if not CUDA:
        return {}
    return {"n_gpu_layers": -1, **{key: facts[key] for key in ("n_batch", "n_ubatch", "flash_attn")}}


def stop_string(text: str) -> str:
    """On the CPU the default model's words; on the GPU four characters from the second half of the text."""
    if not CUDA:
        return "country of"
    return next((text[k : k + 4] for k in range(len(text) // 2, len(text) - 3) if text[k : k + 4].strip()), "")


REPETITIVE = "one two three one two three one two three one two three one two three"


def penalties(engine: Any, llm: Any) -> dict[str, Any]:
    """A repetitive prompt without and with each penalty (greedy, and seeded twice); a logit bias."""
    greedy = {"prompt": REPETITIVE, "max_tokens": 24, "temperature": 0.0}
    seeded = {"prompt": REPETITIVE, "max_tokens": 24, "temperature": 0.8, "seed": 7}
    out: dict[str, Any] = {"greedy": {}, "seeded": {}}
    for name, setting in (
        ("none", {}),
        ("repeat_penalty", {"repeat_penalty": 1.5}),
        ("presence_penalty", {"presence_penalty": 1.5}),
        ("frequency_penalty", {"frequency_penalty": 1.5}),
        ("repeat_penalty_last_0", {"repeat_penalty": 1.5, "penalty_last_n": 0}),
    ):
        out["greedy"][name] = ours(engine, **greedy, **setting)["text"]
        out["seeded"][name] = [ours(engine, **seeded, **setting)["text"] for _ in range(2)]
    token = llm.tokenize(" banana".encode(), add_bos=False)[0]
    out["biased_token"] = llm.detokenize([token]).decode("utf-8", "replace")
    out["biased"] = ours(engine, **greedy, logit_bias={str(token): 100.0})["text"]
    out["min_p_1"] = [ours(engine, **{**seeded, "seed": seed}, min_p=1.0)["text"] for seed in (1, 2)]
    try:
        ours(engine, **greedy, logit_bias={str(llm.n_vocab()): 1.0})
        out["out_of_vocabulary"] = None
    except RequestError as exc:
        out["out_of_vocabulary"] = [exc.code, str(exc)]
    return out


def main() -> None:
    _, defaults = load()
    _, explicit = load(n_threads=1, n_threads_batch=2, n_batch=256, n_ubatch=128, flash_attn=True)
    engine, facts = load(**THREADS)
    llamacpp_loop.PIECE_BUFFER_BYTES = 1
    small_buffer, _ = load(**THREADS)
    llm = llama_cpp.Llama(model_path=MODEL, n_ctx=2048, verbose=False, **THREADS, **same_settings(facts))
    cases = []
    for case in CASES:
        cases.append(
            {
                "case": case,
                "ours": ours(engine, **case),
                "small_buffer": ours(small_buffer, **case),
                "reference": reference(llm, **case),
            }
        )
    stop = {**CASES[0], "stop": [stop_string(cases[0]["ours"]["text"])]}
    out = {
        "facts": facts,
        "physical_cores": physical_cores(),
        "defaults": defaults,
        "explicit": explicit,
        "cases": cases,
        "cancelled": ours(engine, stop_after=5, **CASES[0]),
        "stopped": {"ours": ours(engine, **stop), "reference": reference(llm, **stop), "stop": stop["stop"][0]},
        "eog_picks": eog_picks(llm, TokenLoop(llama_cpp, llm.model, llm.ctx, 512)),
        "penalties": penalties(engine, llm),
    }
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
