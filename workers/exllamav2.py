"""The ExLlamaV2 engine (EXL2 models, NVIDIA GPUs).  The only module importing exllamav2 and torch.

exllamav2 0.3.2 compiles its CUDA extension when it is imported, and fails
with an OSError about CUDA_HOME on a machine without CUDA.  So torch is
asked first: without a CUDA device the module raises EngineUnavailable with
a one-line reason and never imports exllamav2 (the worker then exits with
the "unavailable" code and the daemon does not restart it).

Generation uses the dynamic generator: one job per request, streamed with
``generator.iterate()``, cancelled between iterations with
``generator.cancel(job)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .engine import (
    EmitFn,
    EngineUnavailable,
    GenerateRequest,
    GenerateResult,
    ModelError,
    ProgressFn,
    RequestError,
    StopFn,
)
from .protocol import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, ErrorCode

try:
    import torch
except Exception as exc:
    raise EngineUnavailable(f"torch failed to import: {exc}") from exc

if not torch.cuda.is_available():
    raise EngineUnavailable(f"no CUDA: torch {torch.__version__} sees no CUDA device")

try:
    from exllamav2 import (
        ExLlamaV2,
        ExLlamaV2Cache,
        ExLlamaV2Cache_Q4,
        ExLlamaV2Cache_Q6,
        ExLlamaV2Cache_Q8,
        ExLlamaV2Config,
        ExLlamaV2Tokenizer,
    )
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
except (ImportError, OSError, RuntimeError) as exc:  # the CUDA extension failed to build or load
    raise EngineUnavailable(f"exllamav2 failed to import: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc

CACHE_TYPES = {"fp16": ExLlamaV2Cache, "q4": ExLlamaV2Cache_Q4, "q6": ExLlamaV2Cache_Q6, "q8": ExLlamaV2Cache_Q8}


class ExLlamaV2Engine:
    kind = "exllamav2"

    def __init__(self) -> None:
        self._tokenizer: Any = None
        self._generator: Any = None
        self._chat_template: Any = None

    def versions(self) -> dict[str, Any]:
        import exllamav2
        import numpy

        return {
            "exllamav2": getattr(exllamav2, "__version__", None),
            "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "numpy": numpy.__version__,
        }

    def load(self, spec: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        model_dir = Path(spec["model"])
        if not (model_dir / "config.json").is_file():
            raise ModelError(f"not an EXL2 model directory (no config.json): {model_dir}", missing=not model_dir.exists())
        options = spec.get("options") or {}
        cache_type = options.get("cache_type", "fp16")
        if cache_type not in CACHE_TYPES:
            raise ModelError(f"cache_type {cache_type!r} is not one of {', '.join(CACHE_TYPES)}")
        n_ctx = int(spec.get("n_ctx", 2048))
        try:
            config = ExLlamaV2Config(str(model_dir))
            config.max_seq_len = n_ctx
            model = ExLlamaV2(config)
            cache = CACHE_TYPES[cache_type](model, max_seq_len=n_ctx, lazy=True)
            model.load_autosplit(cache, callback=lambda done, total: progress(done / max(total, 1), "loading modules"))
            self._tokenizer = ExLlamaV2Tokenizer(config)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load {model_dir}: {exc}") from exc
        self._generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=self._tokenizer)
        self._chat_template = _chat_template(model_dir)
        return {"model": str(model_dir), "model_name": model_dir.name, "n_ctx": n_ctx, "cache_type": cache_type, "chat_template": self._chat_template is not None}

    def _prompt_ids(self, request: GenerateRequest) -> Any:
        tokenizer = self._tokenizer
        if request.messages is None:
            return tokenizer.encode(request.prompt or "", add_bos=True, encode_special_tokens=True)
        if self._chat_template is None:
            raise RequestError(ErrorCode.INVALID_REQUEST, "this model has no chat template (tokenizer_config.json); send a prompt")
        try:
            text = self._chat_template.render(
                messages=request.messages, add_generation_prompt=True, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
            )
        except Exception as exc:  # the template itself may reject the conversation
            raise RequestError(ErrorCode.INVALID_REQUEST, f"chat template rejected the messages: {exc}") from exc
        # The template writes the BOS token itself when the model wants one.
        return tokenizer.encode(text, add_bos=False, encode_special_tokens=True)

    def generate(self, request: GenerateRequest, emit: EmitFn, should_stop: StopFn) -> GenerateResult:
        input_ids = self._prompt_ids(request)
        prompt_tokens = int(input_ids.shape[-1])
        settings = ExLlamaV2Sampler.Settings()
        settings.temperature = request.temperature
        settings.top_p = request.top_p
        settings.top_k = 1 if request.temperature == 0 else request.top_k  # temperature 0: greedy
        stop: list[Any] = [] if request.ignore_eos else [self._tokenizer.eos_token_id]
        job = ExLlamaV2DynamicJob(
            input_ids=input_ids,
            max_new_tokens=request.max_tokens,
            gen_settings=settings,
            seed=request.seed,
            stop_conditions=stop + list(request.stop),
        )
        generator = self._generator
        generator.enqueue(job)
        generated, finish = 0, FINISH_LENGTH
        while generator.num_remaining_jobs():
            if should_stop():
                generator.cancel(job)
                finish = FINISH_CANCELLED
                break
            for result in generator.iterate():
                if result.get("job") is not job or result.get("stage") != "streaming":
                    continue
                if result.get("text"):
                    emit(result["text"])
                if "token_ids" in result:
                    generated += int(result["token_ids"].shape[-1])
                if result.get("eos"):
                    finish = FINISH_STOP if result.get("eos_reason") in ("stop_token", "stop_string") else FINISH_LENGTH
                    generated = int(result.get("new_tokens", generated))
        return GenerateResult(finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=generated)


def _chat_template(model_dir: Path) -> Any:
    """The model's own chat template (tokenizer_config.json), compiled with a sandboxed Jinja."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def create_engine() -> ExLlamaV2Engine:
    return ExLlamaV2Engine()
