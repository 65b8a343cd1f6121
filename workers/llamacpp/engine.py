"""The llama.cpp engine, through llama-cpp-python.  The only module importing llama_cpp.

``Llama`` loads the model and context and tokenizes; generation runs on
llama.cpp's C API (loop.py), not ``Llama.generate`` or
``create_completion``: a native sampler chain, no per-token NumPy or logits
copy, exact token counts, a stop check between every two tokens, and
incremental detokenization (create_completion's stream re-detokenizes the
whole completion at every token).
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any, Protocol

from ..engine import (
    EmbedProgressFn,
    EmbedResult,
    EmitFn,
    EngineUnavailable,
    GenerateResult,
    ModelError,
    OutOfGpuMemory,
    ProgressFn,
    RequestError,
    StopFn,
)
from ..protocol.messages import (
    CAP_EMBEDDINGS,
    CAP_GRAMMAR,
    CAP_LOGIT_BIAS,
    CAP_LOGPROBS,
    CAP_PENALTIES,
    CAP_RESPONSE_FORMAT,
    CAP_TOOLS,
    Embed,
    Generate,
    LoadSpec,
    Sampling,
)
from ..protocol import ErrorCode
from .log import LlamaLog, python_prints
from .logprobs import LogprobRecorder
from .loop import TokenLoop
from .batch import SequenceBatch
from .embed import EMBED_SEQUENCES, POOLING_TYPES, EmbedLoop, model_pooling
from .native import backend_devices, context_params, load_progress
from .settings import FLASH_ATTN_ENABLED, LoadSettings, choose, split_kwargs
from ..protocol.tool_calls import call_schema, is_forced
from ..textstream import TextAssembler
from ..tool_prompt import for_template, tools_as_messages

try:
    import llama_cpp
    from llama_cpp import llama_chat_format, llama_grammar
except Exception as exc:  # a broken build fails here (missing libllama, bad ABI)
    raise EngineUnavailable(f"llama_cpp failed to import: {exc}") from exc


_LOG = LlamaLog(llama_cpp)


def build_facts() -> dict[str, Any]:
    """What this llama-cpp-python build can do, for `envs check` and the hello message.

    ``llama_supports_gpu_offload()`` is true only when the build has a GPU
    backend *and* a device is present, so the compiled-in backends are
    reported separately: a CPU-only build on a GPU node is the case to catch.
    """
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    backends = sorted(
        p.name.split(".")[0].removeprefix("libggml-")
        for p in lib_dir.glob("libggml-*")
        if not p.name.startswith(("libggml-base", "libggml-cpu"))
    )
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "gpu_backends_built": backends,
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }


def _cache_kwargs(cache_type: str) -> dict[str, Any]:
    """Llama() arguments for a KV cache type (a quantized V cache needs flash attention: settings.py)."""
    ggml_type = {
        "f16": llama_cpp.GGML_TYPE_F16,
        "q8_0": llama_cpp.GGML_TYPE_Q8_0,
        "q4_0": llama_cpp.GGML_TYPE_Q4_0,
    }.get(cache_type)
    if ggml_type is None:
        raise ModelError(f"cache_type {cache_type!r} is not one of f16, q8_0, q4_0")
    return {} if cache_type == "f16" else {"type_k": ggml_type, "type_v": ggml_type}


class LlamaCppEngine:
    kind = "llamacpp"
    # the ready message's (workers/protocol/messages.py)
    capabilities = (CAP_PENALTIES, CAP_LOGIT_BIAS, CAP_RESPONSE_FORMAT, CAP_GRAMMAR, CAP_TOOLS, CAP_LOGPROBS)

    def __init__(self) -> None:
        self._llm: Any = None
        self._loop: TokenLoop | None = None
        self._chat_formatter: Any = None
        self._model_name = "this model"
        self.slots = 1  # requests generated at once: the spec's "parallel" (BatchEngine, workers/batch.py)
        self._batch: SequenceBatch | None = None
        self._embed_loop: EmbedLoop | None = None  # embedding mode (the spec's "embedding"): embed, no generate

    def versions(self) -> dict[str, Any]:
        import numpy

        return {**build_facts(), "numpy": numpy.__version__}

    def load(self, spec: LoadSpec, progress: ProgressFn) -> dict[str, Any]:
        model_path = Path(spec.model)
        if not model_path.is_file():
            raise ModelError(f"model file not found: {model_path}", missing=True)
        options: dict[str, Any] = dict(spec.options or {})
        cache_type = spec.cache_type or "f16"
        n_gpu_layers = spec.n_gpu_layers
        on_gpu = n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
        settings = choose(spec, options, layers_on_gpu=on_gpu, quantized_cache=cache_type != "f16")
        options.pop("flash_attn", None)  # set through the context parameters below, "auto" included
        # The planned split first: tensor_split or main_gpu set in the engine's options win.
        kwargs = {**split_kwargs(spec), **options, **settings.llama_kwargs(), **_cache_kwargs(cache_type)}
        self.slots = 1 if spec.embedding else max(1, int(spec.parallel or 1))
        n_ctx = int(spec.n_ctx or 2048)
        # parallel: one sequence per request in one context, n_ctx cells each (not shared: kv_unified off).
        several = {"n_seq_max": self.slots, "n_ctx": n_ctx * self.slots, "kv_unified": False} if self.slots > 1 else {}
        if spec.embedding:
            several = self._embedding_params(spec, kwargs, n_ctx)
        kwargs.update(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            # verbose=True keeps llama.cpp's log (workers/llamacpp/log.py);
            # verbose=False would point the whole process's fd 1 and 2 at
            # /dev/null while loading.
            verbose=True,
        )
        progress(0.0, f"loading {model_path.name}")
        _LOG.quiet, _LOG.offloaded, _LOG.out_of_memory, _LOG.flash_attn = False, None, None, None
        try:
            with (
                load_progress(llama_cpp, progress),
                python_prints(),
                context_params(llama_cpp, flash_attn_type=settings.flash_attn, **several),
            ):
                self._llm = llama_cpp.Llama(**kwargs)
        except ValueError as exc:  # llama-cpp-python's way of saying "could not load"
            if _LOG.out_of_memory:
                raise OutOfGpuMemory(f"not enough GPU memory to load {model_path}: {_LOG.out_of_memory}") from exc
            raise ModelError(f"cannot load {model_path}: {exc}") from exc
        finally:
            _LOG.flush()
            _LOG.quiet = True
        llm = self._llm
        if spec.embedding:
            self._embed_loop = EmbedLoop(llama_cpp, llm.model, llm.ctx, spec.normalize)
            self.capabilities = (CAP_EMBEDDINGS,)
        self._loop = TokenLoop(llama_cpp, llm.model, llm.ctx, llama_cpp.llama_n_batch(llm.ctx))
        if self.slots > 1:
            self._batch = SequenceBatch(
                llama_cpp, llm.model, llm.ctx, self.slots, llama_cpp.llama_n_batch(llm.ctx), self._loop
            )
        self._chat_formatter = self._make_chat_formatter(spec.chat_format)
        self._model_name = model_path.name
        progress(1.0, "loaded")
        facts = {**self._facts(model_path, n_gpu_layers), **self._in_force(settings)}
        if self._embed_loop is not None:
            facts.update(embedding=True, n_embd=self._embed_loop.n_embd, pooling=self._embed_loop.pooling)
        return facts

    def _embedding_params(self, spec: LoadSpec, kwargs: dict[str, Any], n_ctx: int) -> dict[str, Any]:
        """Embedding mode: pooled vectors, up to EMBED_SEQUENCES inputs sharing one cache of n_ctx cells per
        decode, and a micro-batch as large as the batch (an input is pooled whole, in one micro-batch)."""
        n_batch = min(n_ctx, int(spec.n_batch or n_ctx))
        kwargs.update(embedding=True, n_batch=n_batch, n_ubatch=n_batch)
        pooling = POOLING_TYPES[spec.pooling] if spec.pooling else lambda model: model_pooling(llama_cpp, model)
        sequences = min(EMBED_SEQUENCES, llama_cpp.llama_max_parallel_sequences())
        return {"embeddings": True, "pooling_type": pooling, "n_seq_max": sequences, "kv_unified": True}

    def embed(self, request: Embed, progress: EmbedProgressFn) -> EmbedResult | None:
        loop = self._embed_loop
        if loop is None:
            raise RequestError(ErrorCode.UNSUPPORTED_PARAMETER, "input: this engine is not in embedding mode")
        llm = self._llm
        if request.texts is not None:
            inputs = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in request.texts]
        else:
            inputs = [list(tokens) for tokens in request.token_arrays or ()]
        vectors = loop.embed(inputs, progress)
        return None if vectors is None else EmbedResult(vectors=vectors, prompt_tokens=sum(map(len, inputs)))

    def _facts(self, model_path: Path, n_gpu_layers: int) -> dict[str, Any]:
        """What was loaded, and where: what llama.cpp did, not what was asked."""
        llm = self._llm
        return {
            "model": str(model_path),
            "model_name": llm.metadata.get("general.name", model_path.stem),
            "architecture": llm.metadata.get("general.architecture"),
            "n_ctx": llama_cpp.llama_n_ctx_seq(llm.ctx),  # what one request can use
            "parallel": self.slots,
            "n_vocab": llm.n_vocab(),
            "chat_template": self._chat_formatter.name if self._chat_formatter else None,
            "n_gpu_layers": n_gpu_layers,
            # layers offloaded / layers (the output layer counts as one more)
            "offloaded_layers": _LOG.offloaded[0] if _LOG.offloaded else 0,
            "offloadable_layers": _LOG.offloaded[1]
            if _LOG.offloaded
            else llama_cpp.llama_model_n_layer(llm._model.model) + 1,
            "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
            "devices": backend_devices(Path(llama_cpp.__file__).parent / "lib"),
        }

    def _in_force(self, asked: LoadSettings) -> dict[str, Any]:
        """The threads, batch sizes and flash attention the context runs with, read back from llama.cpp."""
        ctx = self._llm.ctx
        flash_attn = _LOG.flash_attn if _LOG.flash_attn is not None else asked.flash_attn == FLASH_ATTN_ENABLED
        return {
            "n_threads": llama_cpp.llama_n_threads(ctx),
            "n_threads_batch": llama_cpp.llama_n_threads_batch(ctx),
            "n_batch": llama_cpp.llama_n_batch(ctx),
            "n_ubatch": llama_cpp.llama_n_ubatch(ctx),
            "flash_attn": flash_attn,
        }

    def _make_chat_formatter(self, chat_format: str | None) -> "ChatFormatter | None":
        """How chat messages become a prompt, in order of preference:

        1. the engine's ``chat_format`` option: a llama.cpp built-in template name;
        2. the model's own template (GGUF ``tokenizer.chat_template``), rendered
           the way llama-cpp-python renders it.

        Else none: a model without a template is a base model (the default
        Gemma 3 270M is one), and a chat template borrowed from its family
        only makes it answer junk; chat requests are refused, saying so.
        """
        llm = self._llm
        if chat_format:
            return _BuiltinTemplate(chat_format)
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            eos_id, bos_id = llm.token_eos(), llm.token_bos()
            return _JinjaTemplate(
                llama_chat_format.Jinja2ChatFormatter(
                    template=template,
                    eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
                    bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
                )
            )
        return None

    def _prompt_tokens(self, request: Generate) -> tuple[list[int], list[str]]:
        """Tokens to evaluate and any stop strings the chat format adds."""
        llm = self._llm
        if self._embed_loop is not None:  # as llama-server --embeddings refuses completions
            raise RequestError(
                ErrorCode.UNSUPPORTED_PARAMETER,
                "prompt: this engine is loaded in embedding mode (embedding = true): it embeds, it does not generate",
            )
        if request.messages is None:
            return llm.tokenize((request.prompt or "").encode("utf-8"), add_bos=True, special=True), []
        if self._chat_formatter is None:
            raise RequestError(
                ErrorCode.INVALID_REQUEST,
                f"{self._model_name} has no chat template (tokenizer.chat_template): it is a base model, which "
                "continues text rather than answering messages; send a prompt instead (no --chat), use an "
                "instruction-tuned model (node-supervisor pull REPO), or set the engine's chat_format option",
            )
        try:
            params = request.params
            prompt, has_bos, stop = self._chat_formatter.format(
                list(request.messages), params.tools, params.tool_choice
            )
        except Exception as exc:  # the template itself may reject the conversation
            raise RequestError(ErrorCode.INVALID_REQUEST, f"chat template rejected the messages: {exc}") from exc
        return llm.tokenize(prompt.encode("utf-8"), add_bos=not has_bos, special=True), stop

    def _prepare(self, request: Generate) -> tuple[list[int], TextAssembler, Any]:
        """The request's prompt tokens (checked against one request's context), text assembler and sampler chain."""
        tokens, chat_stop = self._prompt_tokens(request)
        if not tokens:  # an empty prompt to a model that adds no start token: no logits to sample from
            raise RequestError(
                ErrorCode.INVALID_REQUEST, "the prompt is empty and this model adds no start token to continue from"
            )
        n_ctx = llama_cpp.llama_n_ctx_seq(self._llm.ctx)
        if len(tokens) >= n_ctx:
            raise RequestError(ErrorCode.CONTEXT_OVERFLOW, f"prompt is {len(tokens)} tokens; the context holds {n_ctx}")
        # Same seeding rule as create_completion: an explicit seed, else a fresh one.
        seed = request.params.seed if request.params.seed is not None else int.from_bytes(os.urandom(4), "little")
        assert self._loop is not None, "generate before load"
        sampler = self._loop.sampler(request.params, seed, tokens, _grammar(request.params))
        return tokens, TextAssembler(list(request.params.stop) + chat_stop), sampler

    def _logprobs(self, params: Sampling, emit: EmitFn, sampler: Any) -> tuple[EmitFn, Any]:
        """The emit and draw of a request: its own, or the logprobs recorder's when it asked (logprobs.py),
        which draws with the sampler's own (constrained.py's under a grammar)."""
        if not params.logprobs:
            return emit, None
        assert self._loop is not None
        draw = self._loop.sample_function(sampler)
        recorder = LogprobRecorder(llama_cpp, self._llm.n_vocab(), params.top_logprobs, self._loop.piece, draw)
        return recorder.emit_through(emit), recorder.sample

    # --- several requests at once (parallel > 1) ---------------------------------------------

    def begin(self, request: Generate, emit: EmitFn) -> None:
        assert self._batch is not None, "begin without parallel"
        tokens, text, sampler = self._prepare(request)
        emit, sample = self._logprobs(request.params, emit, sampler)
        self._batch.begin(
            request.request_id,
            tokens,
            sampler,
            text,
            emit,
            request.params.max_tokens,
            not request.params.ignore_eos,
            sample,
        )

    def step(self) -> list[tuple[str, GenerateResult]]:
        assert self._batch is not None
        return self._batch.step()

    def end(self, request_id: str) -> GenerateResult:
        assert self._batch is not None
        return self._batch.end(request_id)

    # --- one request at a time ------------------------------------------------------------

    def generate(self, request: Generate, emit: EmitFn, should_stop: StopFn) -> GenerateResult:
        tokens, text, sampler = self._prepare(request)
        loop = self._loop
        assert loop is not None
        n_ctx = self._llm.n_ctx()
        emit, sample = self._logprobs(request.params, emit, sampler)
        try:
            loop.prefill(tokens)
            budget = min(request.params.max_tokens, n_ctx - len(tokens))
            generated, finish = loop.run(
                sampler, budget, not request.params.ignore_eos, should_stop, text, emit, sample
            )
        finally:
            loop.free(sampler)
        tail = text.flush()
        if tail:
            emit(tail, text.take_tokens())
        return GenerateResult(finish_reason=finish, prompt_tokens=len(tokens), completion_tokens=generated)


def _grammar(params: Sampling) -> str | None:
    """The GBNF a request's output follows: its grammar as given, any JSON for json_object, its JSON schema
    converted by llama.cpp's own converter (as llama-cpp-python ships it) for json_schema; None: free text."""
    if params.grammar is not None:
        return params.grammar
    if params.tools and is_forced(params.tool_choice):  # the output must be one call: a grammar enforces it
        try:
            return llama_grammar.json_schema_to_gbnf(json.dumps(call_schema(params.tools, params.tool_choice)))
        except Exception as exc:  # as below: a parameters schema the converter cannot follow
            raise RequestError(
                ErrorCode.INVALID_REQUEST,
                f"tools: a function's parameters cannot be converted to a grammar: {type(exc).__name__}: {exc}"[:300],
            ) from None
    response_format = params.response_format
    if response_format is None:
        return None
    if response_format["type"] == "json_object":
        return llama_grammar.JSON_GBNF
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(response_format["json_schema"]["schema"]))
    except Exception as exc:  # the converter's KeyError, ValueError, RecursionError, ... on a schema it cannot follow
        raise RequestError(
            ErrorCode.INVALID_REQUEST,
            f"response_format.json_schema.schema: cannot be converted to a grammar: {type(exc).__name__}: {exc}"[:300],
        ) from None


# Architectures whose GGUF files often lack a template, mapped to the llama.cpp
# built-in template of their family.


Tools = tuple[dict[str, Any], ...] | None


class ChatFormatter(Protocol):
    name: str

    def format(
        self, messages: list[dict[str, Any]], tools: Tools = None, tool_choice: Any = None
    ) -> tuple[str, bool, list[str]]:
        """(prompt, whether it already starts with BOS, extra stop strings)"""


class _JinjaTemplate:
    """The GGUF's own template.  One that reads ``tools`` gets them (and tool messages) as Hugging Face's
    templates take them; one that does not gets the conversation rewritten by workers/tool_prompt.py."""

    name = "gguf"

    def __init__(self, formatter: Any) -> None:
        self._formatter = formatter
        self.renders_tools = "tools" in formatter.template

    def format(
        self, messages: list[dict[str, Any]], tools: Tools = None, tool_choice: Any = None
    ) -> tuple[str, bool, list[str]]:
        if not self.renders_tools:
            result = self._formatter(messages=tools_as_messages(messages, list(tools or ()), tool_choice))
        elif tools and tool_choice != "none":
            result = self._formatter(messages=for_template(messages), tools=list(tools))
        else:
            result = self._formatter(messages=for_template(messages))
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return result.prompt, bool(result.added_special), [s for s in stop if s]


class _BuiltinTemplate:
    """A template compiled into llama.cpp, applied with llama_chat_apply_template."""

    def __init__(self, name: str) -> None:
        self.name = name

    def format(
        self, messages: list[dict[str, Any]], tools: Tools = None, tool_choice: Any = None
    ) -> tuple[str, bool, list[str]]:
        plain = tools_as_messages(messages, list(tools or ()), tool_choice)  # role and content only: tools as text
        keep = [(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in plain]
        chat = (llama_cpp.llama_chat_message * len(keep))(
            *(llama_cpp.llama_chat_message(role=r, content=c) for r, c in keep)
        )
        size = 4096 + 2 * sum(len(r) + len(c) for r, c in keep)
        for _attempt in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(self.name.encode("utf-8"), chat, len(keep), True, buf, size)
            if n < 0:
                raise ValueError(f"llama.cpp has no chat template named {self.name!r}")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace"), False, []
            size = n  # the buffer was too small: n is what it needs
        raise ValueError("chat template output kept growing")


def create_engine() -> LlamaCppEngine:
    return LlamaCppEngine()
