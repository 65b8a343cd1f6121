"""The ExLlamaV2 engine (EXL2 models, NVIDIA GPUs).  The only module importing exllamav2 and torch.

exllamav2 0.3.2 JIT-compiles its CUDA extension when it is imported and
fails with an OSError about CUDA_HOME on a machine without CUDA.  So torch
is asked first: without a CUDA device this module raises EngineUnavailable
with a one-line reason and never imports exllamav2 (the worker then exits
with the "unavailable" code and the daemon does not restart it).

Generation uses the dynamic generator: one job per request, streamed with
``generator.iterate()`` (one token sampled per call for our job, as no draft
model is used, though one result may release several held-back tokens) and
cancelled between two calls with ``generator.cancel(job)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..engine import (
    EmitFn,
    EngineUnavailable,
    GenerateResult,
    ModelError,
    OutOfGpuMemory,
    ProgressFn,
    RequestError,
    StopFn,
)
from ..protocol.messages import CAP_LOGIT_BIAS, CAP_PENALTIES, Generate, LoadSpec
from ..protocol import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, ErrorCode
from .split import gpu_split, weights_bytes


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


try:
    import torch
except Exception as exc:  # a broken or missing torch
    raise EngineUnavailable(f"torch failed to import: {_one_line(exc)}") from None

if not torch.cuda.is_available():
    _cpu_build = (
        " (a CPU-only build: this environment needs a CUDA build of torch)" if torch.version.cuda is None else ""
    )
    raise EngineUnavailable(f"no CUDA: torch {torch.__version__} sees no CUDA device{_cpu_build}")

try:
    import exllamav2
    from exllamav2 import (
        ExLlamaV2,
        ExLlamaV2Cache,
        ExLlamaV2Cache_Q4,
        ExLlamaV2Cache_Q6,
        ExLlamaV2Cache_Q8,
        ExLlamaV2Config,
        ExLlamaV2Tokenizer,
    )
    from exllamav2.attn import has_flash_attn_with_paged
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
except Exception as exc:  # the CUDA extension failed to build or load (no nvcc, ABI mismatch)
    raise EngineUnavailable(f"exllamav2 failed to import: {_one_line(exc)}") from None

# "cache_type" option -> cache class.  (ExLlamaV2Cache_8bit is left out: the
# dynamic generator refuses it; Q8 is the quantized 8-bit cache it accepts.)
CACHE_TYPES = {"fp16": ExLlamaV2Cache, "q4": ExLlamaV2Cache_Q4, "q6": ExLlamaV2Cache_Q6, "q8": ExLlamaV2Cache_Q8}
PAGE_SIZE = 256  # the dynamic generator wants a cache length that is a multiple of this

# exllamav2's ways of saying "this model will not load here": asserts for a
# bad directory or architecture, FileNotFoundError for a missing tokenizer.json,
# torch.cuda.OutOfMemoryError (a RuntimeError) when it does not fit.
_LOAD_ERRORS = (AssertionError, OSError, ValueError, KeyError, TypeError, RuntimeError)


class ExLlamaV2Engine:
    kind = "exllamav2"
    capabilities = (CAP_PENALTIES, CAP_LOGIT_BIAS)

    def __init__(self) -> None:
        self._tokenizer: Any = None
        self._generator: Any = None
        self._stop_tokens: list[int] = []
        self._n_ctx = 0
        self._chat_template: Any = None
        self._no_template_reason = "this model has no chat template"

    def versions(self) -> dict[str, Any]:
        import numpy

        return {
            "exllamav2": getattr(exllamav2, "__version__", None),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "flash_attn_paged": bool(has_flash_attn_with_paged),
            "numpy": numpy.__version__,
        }

    def load(self, spec: LoadSpec, progress: ProgressFn) -> dict[str, Any]:
        model_dir = Path(spec.model)
        if not model_dir.is_dir():
            raise ModelError(f"model directory not found: {model_dir}", missing=True)
        if not (model_dir / "config.json").is_file():
            raise ModelError(f"not an EXL2 model directory (no config.json): {model_dir}")
        options = dict(spec.options or {})
        if len(spec.split_mib) > 1 and not options.get("gpu_split"):  # split by the daemon; an explicit one wins
            options["gpu_split"] = gpu_split(spec.split_mib, weights_bytes(model_dir))
        # The option names ExLlamaV2's own type; the spec's (the plan's) uses llama.cpp's names.
        cache_type = str(options.get("cache_type") or {"q8_0": "q8", "q4_0": "q4"}.get(spec.cache_type or "", "fp16"))
        if cache_type not in CACHE_TYPES:
            raise ModelError(f"cache_type {cache_type!r} is not one of {', '.join(CACHE_TYPES)}")
        # Round up to whole cache pages rather than refuse an n_ctx like 2000.
        n_ctx = -(-int(spec.n_ctx) // PAGE_SIZE) * PAGE_SIZE
        progress(0.0, f"loading {model_dir.name}")
        try:
            config = ExLlamaV2Config(str(model_dir))
            config.max_seq_len = n_ctx
            config.arch_compat_overrides()  # turns off attention kernels the architecture cannot use
            model = ExLlamaV2(config)
            cache = self._load_weights(model, CACHE_TYPES[cache_type], n_ctx, options, progress)
            tokenizer = ExLlamaV2Tokenizer(config)
            # Paged attention needs flash-attn >= 2.5.7; without it the generator
            # runs unpaged, one sequence at a time, which is all a worker serves.
            paged = bool(options.get("paged", has_flash_attn_with_paged and not config.no_flash_attn))
            self._generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=paged)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfGpuMemory(f"not enough GPU memory to load {model_dir}: {_one_line(exc)}") from exc
        except _LOAD_ERRORS as exc:
            raise ModelError(f"cannot load {model_dir}: {_one_line(exc)}") from exc
        self._tokenizer, self._n_ctx = tokenizer, n_ctx
        # Instruct models end a turn with tokens besides the tokenizer's EOS
        # (Llama 3's <|eot_id|>): generation_config.json lists them all.
        extra = (getattr(config, "generation_config", None) or {}).get("eos_token_id") or []
        self._stop_tokens = sorted({t for t in [tokenizer.eos_token_id, *extra] if isinstance(t, int)})
        self._chat_template, self._no_template_reason = _chat_template(model_dir)
        progress(1.0, "loaded")
        return {
            "model": str(model_dir),
            "model_name": model_dir.name,
            "architecture": getattr(config.arch, "arch_string", None),
            "n_ctx": n_ctx,
            "cache_type": cache_type,
            "paged": paged,
            "chat_template": self._chat_template is not None,
        }

    @staticmethod
    def _load_weights(model: Any, cache_class: Any, n_ctx: int, options: dict[str, Any], progress: ProgressFn) -> Any:
        """Load the weights, reporting per-module progress; return the cache.

        With ``gpu_split`` (GB per GPU) the split is manual and the cache is
        allocated after the weights; otherwise load_autosplit fills the GPUs
        in turn and allocates a lazy cache as it goes.
        """
        last = [-1.0]

        def on_module(done: int, total: int) -> None:
            fraction = done / max(total, 1)
            if fraction - last[0] >= 0.05 or done >= total:
                last[0] = fraction
                progress(fraction, "loading modules")

        if options.get("gpu_split"):
            model.load(gpu_split=[float(x) for x in options["gpu_split"]], callback=on_module)
            return cache_class(model, max_seq_len=n_ctx)
        cache = cache_class(model, max_seq_len=n_ctx, lazy=True)
        model.load_autosplit(cache, reserve_vram=options.get("reserve_vram"), callback=on_module)
        return cache

    def _prompt_ids(self, request: Generate) -> Any:
        tokenizer = self._tokenizer
        if request.messages is None:
            return tokenizer.encode(request.prompt or "", add_bos=True, encode_special_tokens=True)
        if self._chat_template is None:
            raise RequestError(
                ErrorCode.INVALID_REQUEST, f"{self._no_template_reason}; send a prompt instead of messages"
            )
        try:
            text = self._chat_template.render(
                messages=request.messages,
                add_generation_prompt=True,
                bos_token=tokenizer.bos_token,
                eos_token=tokenizer.eos_token,
            )
        except Exception as exc:  # the template itself may reject the conversation (raise_exception)
            raise RequestError(ErrorCode.INVALID_REQUEST, f"chat template rejected the messages: {exc}") from exc
        # The template writes the BOS token itself when the model wants one.
        return tokenizer.encode(text, add_bos=False, encode_special_tokens=True)

    def _sampler(self, request: Generate) -> Any:
        """Sampling settings, as the llama.cpp engine reads them: temperature 0 is
        greedy; min-p; the penalties (off by default: exllamav2's own default
        repetition penalty is 1.025) over the last ``penalty_last_n`` tokens
        (-1: all; 0: off); ``logit_bias`` added to the logits (token_bias)."""
        params = request.params
        if params.temperature <= 0:
            settings = ExLlamaV2Sampler.Settings.greedy()
        else:
            settings = ExLlamaV2Sampler.Settings(
                temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p
            )
        settings.token_repetition_penalty = 1.0
        if params.penalty_last_n != 0:
            settings.token_repetition_penalty = params.repeat_penalty
            settings.token_presence_penalty = params.presence_penalty
            settings.token_frequency_penalty = params.frequency_penalty
            settings.token_repetition_range = params.penalty_last_n
        if params.logit_bias:
            vocab_size = self._tokenizer.config.vocab_size
            bias = torch.zeros((vocab_size - vocab_size % -32,), dtype=torch.float)  # padded as exllamav2 pads it
            for key, value in params.logit_bias.items():
                if int(key) >= vocab_size:
                    raise RequestError(
                        ErrorCode.INVALID_REQUEST, f"logit_bias[{key}]: not a token of this model (it has {vocab_size})"
                    )
                bias[int(key)] = value
            settings.token_bias = bias
        return settings

    def generate(self, request: Generate, emit: EmitFn, should_stop: StopFn) -> GenerateResult:
        input_ids = self._prompt_ids(request)
        prompt_tokens = int(input_ids.shape[-1])
        if prompt_tokens == 0:
            raise RequestError(ErrorCode.INVALID_REQUEST, "the prompt is empty")
        if prompt_tokens >= self._n_ctx:
            raise RequestError(
                ErrorCode.CONTEXT_OVERFLOW, f"prompt is {prompt_tokens} tokens; the context holds {self._n_ctx}"
            )
        stop: list[int | str] = [] if request.params.ignore_eos else list(self._stop_tokens)
        stop += [s for s in request.params.stop if s]
        job = ExLlamaV2DynamicJob(
            input_ids=input_ids,
            max_new_tokens=min(request.params.max_tokens, self._n_ctx - prompt_tokens),
            gen_settings=self._sampler(request),
            seed=request.params.seed,
            stop_conditions=stop,
        )
        generator = self._generator
        generator.enqueue(job)
        try:
            finish = _stream(generator, job, emit, should_stop)
        except BaseException:
            generator.cancel(job)  # free its cache pages: the next request starts on an empty generator
            raise
        # job.new_tokens counts sampled tokens, held-back text (a partial stop
        # string) included; it is -1 only before a token-healing first token.
        return GenerateResult(
            finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=max(job.new_tokens, 0)
        )


def _stream(generator: Any, job: Any, emit: EmitFn, should_stop: StopFn) -> str:
    """Run ``job`` to its end, emitting text; return the finish reason.

    Each ``iterate()`` call ingests one chunk of the prompt or samples one
    token for the job, so checking ``should_stop`` between calls stops both a
    long prefill and a stream within one token.  A result's text is what the
    generator stopped holding back (a partial stop string, an incomplete
    character), so it may hold several tokens: their ids come with it.
    """
    uncounted = 0  # tokens of results without text, sent with the next text
    while True:
        if should_stop():
            generator.cancel(job)
            return FINISH_CANCELLED
        for result in generator.iterate():
            if result["job"] is not job or result["stage"] != "streaming":
                continue  # the "started" and "prefill" stages carry no text
            uncounted += _tokens_in(result)
            if result.get("text"):
                emit(result["text"], uncounted)
                uncounted = 0
            if result["eos"]:
                return FINISH_STOP if result.get("eos_reason") in ("stop_token", "stop_string") else FINISH_LENGTH


def _tokens_in(result: dict[str, Any]) -> int:
    """How many tokens a streaming result carries.

    exllamav2 0.3.2 sends the held-back tokens' ids with their text as
    ``token_ids``, a tensor of shape (1, n); a result without them carries
    one token if it has text, none if it only says that text is held back.
    """
    token_ids = result.get("token_ids")
    if token_ids is not None:
        return int(token_ids.shape[-1])
    return 1 if result.get("text") else 0


def _chat_template(model_dir: Path) -> tuple[Any, str]:
    """The model's own chat template, compiled in a sandbox, or (None, why not).

    Looked for where transformers keeps it: ``chat_template.jinja`` beside the
    model, else the "chat_template" of tokenizer_config.json (a string, or a
    list of named templates of which "default" is the one to use).
    """
    template: Any = None
    jinja_file = model_dir / "chat_template.jinja"
    config_file = model_dir / "tokenizer_config.json"
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    elif config_file.is_file():
        try:
            template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        except ValueError as exc:
            return None, f"tokenizer_config.json is not valid JSON ({exc})"
        if isinstance(template, list):
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template:
        return None, "this model has no chat template (tokenizer_config.json has no chat_template)"
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None, "jinja2 is not installed in the exllamav2 environment"

    def raise_exception(message: str) -> None:  # what HF templates call to refuse a conversation
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template), ""
    except TemplateError as exc:
        return None, f"the model's chat template does not compile: {exc}"


def create_engine() -> ExLlamaV2Engine:
    return ExLlamaV2Engine()
