"""The baseline: llama-cpp-python called directly, in this process.

Run with the llama.cpp environment's interpreter (the daemon's cannot import
llama_cpp).  Loads the model once, then answers one JSON line per command
read from stdin, so throughput.py can interleave blocks of direct and daemon
runs without reloading:

    {"prompt": ..., "max_tokens": 128, "seed": 42, "ignore_eos": false, "reps": 3, "mode": "generate" | "completion"}
    -> {"runs": [{"text": ..., "tokens": n, "ttft_s": ..., "total_s": ...}, ...]}

    argv: model n_ctx n_threads n_threads_batch [n_batch n_ubatch flash_attn(0|1) n_gpu_layers]

ignore_eos: the generate loop does not stop at an end-of-generation token
(the library has no ban on one that costs no Python per token), so the text
stays the others' as long as greedy decoding picks none: the default prompt
runs past 128 tokens without one, and the benchmarks compare the texts.

Two ways of calling the library:
  generate    Llama.generate token by token, detokenizing each token: the
              loop the worker ran before it drove llama.cpp's C API itself
              (workers/llamacpp_loop.py), so the daemon's ratio to it is the
              daemon's own cost (process hop, ZeroMQ, scheduling) less what
              the worker's tighter loop saves.
  completion  Llama.create_completion(stream=True): what most programs call.
"""

from __future__ import annotations

import codecs
import json
import sys
import time

import llama_cpp


def run_generate(llm: llama_cpp.Llama, prompt: str, max_tokens: int, seed: int, ignore_eos: bool = False) -> dict:
    started = time.perf_counter()
    llm.set_seed(seed)
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []
    first = None
    count = 0
    for token in llm.generate(tokens, temp=0.0, top_p=0.95, top_k=40):
        if not ignore_eos and llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        count += 1
        piece = decoder.decode(llm.detokenize([token]))
        if piece and first is None:
            first = time.perf_counter() - started
        pieces.append(piece)
        if count >= max_tokens:
            break
    return {"text": "".join(pieces), "tokens": count, "ttft_s": first, "total_s": time.perf_counter() - started}


def run_completion(llm: llama_cpp.Llama, prompt: str, max_tokens: int, seed: int) -> dict:
    started = time.perf_counter()
    pieces: list[str] = []
    first = None
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, seed=seed, stream=True):
        text = chunk["choices"][0]["text"]
        if text and first is None:
            first = time.perf_counter() - started
        pieces.append(text)
    total = time.perf_counter() - started
    text = "".join(pieces)
    # Streamed chunks carry no usage; the greedy text re-tokenizes to the same count.
    count = len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
    return {"text": text, "tokens": count, "ttft_s": first, "total_s": total}


def main() -> None:
    model, n_ctx, n_threads, n_threads_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    # Batch sizes, flash attention and GPU layers as the worker has them in force (the library's defaults if not given).
    n_batch, n_ubatch, flash_attn, n_gpu_layers = (
        [int(a) for a in sys.argv[5:9]] + [512, 512, 0, 0][len(sys.argv[5:9]) :]
    )[:4]
    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads_batch,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        flash_attn=bool(flash_attn),
        n_gpu_layers=n_gpu_layers,
        verbose=False,
    )
    ready = {
        "ready": True,
        "llama_cpp_python": llama_cpp.__version__,
        "n_threads": llm.context_params.n_threads,
        "n_threads_batch": llm.context_params.n_threads_batch,
        "n_batch": llm.context_params.n_batch,
        "n_ubatch": llm.context_params.n_ubatch,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    }
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("mode", "generate") == "generate":
            runs = [
                run_generate(
                    llm, command["prompt"], command["max_tokens"], command["seed"], bool(command.get("ignore_eos"))
                )
                for _ in range(command["reps"])
            ]
        else:
            runs = [
                run_completion(llm, command["prompt"], command["max_tokens"], command["seed"])
                for _ in range(command["reps"])
            ]
        print(json.dumps({"runs": runs}), flush=True)


if __name__ == "__main__":
    main()
