"""Every message of the worker conversation, and the sampling settings of a request, defined once.

Standard-library dataclasses that the daemon, the Python client and the
workers all import (the worker runtime runs in each engine's environment, so
nothing here needs more than the standard library).  A message knows its wire
``type``, writes itself as the JSON object docs/PROTOCOL.md describes
(``to_wire``) and is read back from one (``from_wire``), which checks each
field's type against the annotation (codec.py): a field of the wrong type is a
:class:`ProtocolError` naming it, so a broken or hostile peer is refused at
the edge and the code behind it reads typed attributes, never ``dict.get``.

Adding a sampling setting is one field on :class:`Sampling` (with its
``limits`` metadata: the client op, the HTTP front and the CLI take it from
there) plus the engines that honour it.  Token messages keep their hand-built
fast form (``token_frame_prefix`` in ``__init__``); :class:`Token` is the
general form the daemon also understands.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .codec import ProtocolError, read_fields, write_fields

PROTOCOL_VERSION = 1  # of both conversations; a worker refuses a load of another version

# What a generate op's sampling fields are when the client leaves them out.
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
# llama-cpp-python's min_p, which served requests before the native loop: a seed samples the same text.
DEFAULT_MIN_P = 0.05
DEFAULT_PENALTY_LAST_N = 64  # llama-server's and Ollama's (repeat_last_n)
MAX_LOGIT_BIAS = 1024  # entries of a request's logit_bias


# What an engine can do beyond plain sampling, as its ready message lists it (docs/PROTOCOL.md, Capabilities);
# a request whose fields need one goes only to engines that list it.
CAP_PENALTIES = "penalties"  # repeat_penalty, presence_penalty, frequency_penalty
CAP_LOGIT_BIAS = "logit_bias"
CAP_RESPONSE_FORMAT = "response_format"  # JSON output: json_object, or one that validates against a JSON schema
CAP_GRAMMAR = "grammar"  # output constrained by a GBNF grammar
# tools rendered by the chat template (or a fallback prompt), calls parsed from the output, required/named enforced
CAP_TOOLS = "tools"
CAP_LOGPROBS = "logprobs"  # each token's log-probability and the most likely alternatives
CAP_EMBEDDINGS = "embeddings"  # embed ops: an engine loaded in embedding mode (which then does not generate)
CAPABILITIES = (
    CAP_PENALTIES,
    CAP_LOGIT_BIAS,
    CAP_RESPONSE_FORMAT,
    CAP_GRAMMAR,
    CAP_TOOLS,
    CAP_LOGPROBS,
    CAP_EMBEDDINGS,
)
# What a generating engine lists: every capability but embeddings (an engine embeds or generates, not both).
GENERATE_CAPABILITIES = (CAP_PENALTIES, CAP_LOGIT_BIAS, CAP_RESPONSE_FORMAT, CAP_GRAMMAR, CAP_TOOLS, CAP_LOGPROBS)
MAX_TOOLS = 128  # functions in a request's tools
MAX_GRAMMAR_LENGTH = 65536  # characters of a GBNF grammar
POOLINGS = ("mean", "cls", "last")  # how an embedding engine pools a sequence's token vectors into one
PHASE_EMBEDDING = "embedding"  # a heartbeat's phase while an embed op runs: last_token_age_ms is its last decode
MAX_TOP_LOGPROBS = 20  # alternatives a token's logprobs entry may list (OpenAI's limit)


def _about(help: str, low: float | None = None, high: float | None = None, needs: str | None = None) -> dict[str, Any]:
    """A sampling field's metadata: what it does (the CLI's help), the range a client may ask for, and the
    engine capability it needs when it is not its default."""
    about: dict[str, Any] = {"help": help} if low is None else {"help": help, "limits": (low, high)}
    return about if needs is None else {**about, "needs": needs}


class Record:
    """A dataclass a message carries as one of its fields (codec.py writes and reads it field by field);
    ``WHERE``: its field's name, where a reading error points."""

    WHERE: ClassVar[str] = "record"

    def to_wire(self) -> dict[str, Any]:
        return write_fields(self)

    @classmethod
    def from_wire(cls, message: Any, where: str | None = None) -> Any:
        return read_fields(cls, message, where or cls.WHERE)


@dataclass(frozen=True, kw_only=True)
class Sampling(Record):
    """How a request is sampled: what a generate op may set, what the worker receives as ``params``.

    ``limits`` metadata is the range a client may ask for; ``max_tokens`` is
    further bounded by the daemon's ``max_tokens_limit``.
    """

    WHERE: ClassVar[str] = "params"

    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata=_about("tokens to generate at most", 1, 1 << 31))
    temperature: float = field(default=DEFAULT_TEMPERATURE, metadata=_about("0: greedy", 0.0, 5.0))
    top_p: float = field(default=DEFAULT_TOP_P, metadata=_about("nucleus sampling", 0.0, 1.0))
    top_k: int = field(default=DEFAULT_TOP_K, metadata=_about("0: all tokens", 0, 1_000_000))
    stop: tuple[str, ...] = field(default=(), metadata=_about("stop string (repeatable)"))
    seed: int | None = field(default=None, metadata=_about("same seed, same text", 0, 2**32 - 1))
    ignore_eos: bool = field(default=False, metadata=_about("generate past the end-of-generation token"))
    min_p: float = field(default=DEFAULT_MIN_P, metadata=_about("drop tokens below min_p x the top one's p", 0.0, 1.0))
    repeat_penalty: float = field(
        default=1.0, metadata=_about("1: off; >1 penalizes repeated tokens", 0.01, 5.0, CAP_PENALTIES)
    )
    presence_penalty: float = field(
        default=0.0, metadata=_about("0: off; subtracted once per seen token", -2.0, 2.0, CAP_PENALTIES)
    )
    frequency_penalty: float = field(
        default=0.0, metadata=_about("0: off; subtracted per occurrence", -2.0, 2.0, CAP_PENALTIES)
    )
    penalty_last_n: int = field(
        default=DEFAULT_PENALTY_LAST_N,
        metadata=_about("tokens the penalties look back on; -1: the context", -1, 1 << 20),
    )
    logit_bias: dict[str, float] = field(
        default_factory=dict,
        metadata=_about("token id -> bias added to its logit (-100: banned)", -100.0, 100.0, CAP_LOGIT_BIAS),
    )
    # OpenAI's: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}};
    # the daemon checks its shape and that the schema is an object; the engine converts it (or refuses it).
    response_format: dict[str, Any] | None = field(
        default=None,
        metadata=_about("JSON output: json_object, or json_schema with a schema", needs=CAP_RESPONSE_FORMAT),
    )
    grammar: str | None = field(
        default=None, metadata=_about("a GBNF grammar the output follows", 1, MAX_GRAMMAR_LENGTH, CAP_GRAMMAR)
    )
    # OpenAI's function tools, checked by the daemon (core/tool_validation.py): [{"type": "function",
    # "function": {"name", "description", "parameters"}}]; the engine renders them and parses calls (tool_calls.py).
    tools: tuple[dict[str, Any], ...] | None = field(
        default=None, metadata=_about("function tools the model may call (JSON list)", 1, MAX_TOOLS, CAP_TOOLS)
    )
    # "auto" (None: auto when there are tools), "none", "required", or {"type": "function", "function": {"name"}}.
    tool_choice: Any = field(default=None, metadata=_about("auto, none, required, or a named function (JSON)"))
    parallel_tool_calls: bool = field(default=True, metadata=_about("false: at most one call per answer"))
    # The model's own distribution (a softmax of its raw logits, before bias, penalties, grammar and
    # temperature: what llama-server reports by default); token events then carry LogprobEntry objects.
    logprobs: bool = field(
        default=False, metadata=_about("each token's log-probability, in its token event", needs=CAP_LOGPROBS)
    )
    top_logprobs: int = field(
        default=0,
        metadata=_about("the most likely tokens listed with each (needs logprobs)", 0, MAX_TOP_LOGPROBS, CAP_LOGPROBS),
    )

    def needs(self) -> dict[str, str]:
        """The capabilities this request needs, each with the first field that asks for it."""
        out: dict[str, str] = {}
        for name, capability, default in _NEEDING:
            if capability not in out and getattr(self, name) != default:
                out[capability] = name
        return out


SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Sampling))
# (field, the capability it needs, its default): what Sampling.needs compares.
_NEEDING = tuple(
    (f.name, f.metadata["needs"], f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
    for f in dataclasses.fields(Sampling)
    if "needs" in f.metadata
)


@dataclass(frozen=True, kw_only=True)
class LoadSpec(Record):
    """What a worker loads: the plan's choice where the engine is planned, else the configuration.

    llama.cpp's thread and batch settings are None when unset: the worker's default.
    """

    WHERE: ClassVar[str] = "spec"

    model: str
    n_ctx: int = 2048  # per request (each of ``parallel`` sequences gets this much)
    parallel: int = 1
    n_gpu_layers: int = 0  # -1: all
    cache_type: str = "f16"
    chat_format: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # passed to the engine's loader as they are
    upstream: dict[str, Any] | None = None  # a remote engine's table
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    flash_attn: bool | None = None
    # Split across several GPUs: the MiB planned on each device the worker sees, in CUDA_VISIBLE_DEVICES
    # order (llama.cpp: tensor_split in these proportions, main_gpu 0; ExLlamaV2: gpu_split).  (): one device.
    split_mib: tuple[int, ...] = ()
    # Embedding mode: the context pools one vector per input (embed ops) and generates nothing.
    embedding: bool = False
    pooling: str | None = None  # one of POOLINGS; None: the model's own (GGUF pooling_type), else mean
    normalize: bool = True  # embeddings scaled to unit length (L2)


LOAD_SPEC_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LoadSpec))


class Message:
    """A message with a wire ``type``."""

    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, **write_fields(self)}

    @classmethod
    def from_wire(cls, message: Any, where: str = "message") -> Any:
        return read_fields(cls, {k: v for k, v in message.items() if k != "type"}, where)


# --- worker -> daemon ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """The worker's first word, sent even when its engine cannot run here (status shows why)."""

    TYPE: ClassVar[str] = "hello"
    protocol: int
    engine: str
    worker_id: str
    pid: int
    python: str | None = None
    executable: str | None = None
    packages: dict[str, Any] = field(default_factory=dict)  # versions of numpy, torch, the engine library
    versions: dict[str, Any] = field(default_factory=dict)  # the engine's build facts


@dataclass(frozen=True, kw_only=True)
class Loading(Message):
    TYPE: ClassVar[str] = "loading"
    progress: float | None = None  # 0..1
    message: str | None = None


@dataclass(frozen=True, kw_only=True)
class Ready(Message):
    TYPE: ClassVar[str] = "ready"
    model: dict[str, Any] = field(default_factory=dict)  # facts for status
    slots: int = 1  # requests it generates at once
    capabilities: tuple[str, ...] = ()  # what its engine can do beyond plain sampling (CAPABILITIES)


@dataclass(frozen=True, kw_only=True)
class LoadFailed(Message):
    """The load failed; the worker then exits with ``exit_code``."""

    TYPE: ClassVar[str] = "load_failed"
    code: str
    message: str
    exit_code: int | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class Failed(Message):
    """The engine cannot go on serving (its upstream failed); the worker then exits 1."""

    TYPE: ClassVar[str] = "failed"
    code: str
    message: str
    retry_after_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Progress, so a worker alive but stuck is visible (sent on the watchdog socket)."""

    TYPE: ClassVar[str] = "heartbeat"
    phase: str | None = None  # starting, loading, idle, generating, or PHASE_EMBEDDING
    request_id: str | None = None
    tokens: int = 0
    last_token_age_ms: float | None = None


@dataclass(frozen=True, kw_only=True)
class Token(Message):
    """Generated text; ``tokens`` counts what it holds (0: text held back from tokens already counted).

    ``logprobs`` (only when the request asked for them): one entry per token counted here, in order, each
    ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``: the entries travel with the text
    of their tokens, so text held back (a possible stop string, half a character) holds its entries back
    too, and the tokens of a stop string, never sent, have none.
    """

    TYPE: ClassVar[str] = "token"
    request_id: str
    text: str
    tokens: int = 1
    logprobs: tuple[dict[str, Any], ...] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        if self.logprobs is None:  # not asked: the message stays as it was before logprobs existed
            del wire["logprobs"]
        return wire


@dataclass(frozen=True, kw_only=True)
class Usage(Record):
    WHERE: ClassVar[str] = "usage"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, kw_only=True)
class Done(Message):
    TYPE: ClassVar[str] = "done"
    request_id: str
    finish_reason: str
    usage: Usage = field(default_factory=Usage)
    timings: dict[str, float] = field(default_factory=dict)  # prefill_ms, generate_ms
    # the calls parsed from the output (finish_reason "tool_calls"): {id, type: "function", function: {name,
    # arguments: an object}}; their text was held back, never sent as tokens
    tool_calls: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Embeddings(Message):
    """An embed request's vectors, one per input in input order; ``usage.prompt_tokens``: the tokens embedded."""

    TYPE: ClassVar[str] = "embeddings"
    request_id: str
    vectors: tuple[tuple[float, ...], ...]
    usage: Usage = field(default_factory=Usage)
    timings: dict[str, float] = field(default_factory=dict)  # embed_ms


@dataclass(frozen=True, kw_only=True)
class GenerateError(Message):
    """A request the engine could not serve; the worker goes on."""

    TYPE: ClassVar[str] = "error"
    request_id: str
    code: str
    message: str


# --- daemon -> worker ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Load(Message):
    TYPE: ClassVar[str] = "load"
    protocol: int
    spec: LoadSpec | None  # None when the daemon speaks another protocol: its spec is not read

    @classmethod
    def from_wire(cls, message: Any, where: str = "load") -> Load:
        protocol = message.get("protocol")
        if protocol != PROTOCOL_VERSION:
            return cls(protocol=protocol if isinstance(protocol, int) else -1, spec=None)
        return cls(protocol=protocol, spec=LoadSpec.from_wire(message.get("spec"), f"{where}.spec"))


@dataclass(frozen=True, kw_only=True)
class Generate(Message):
    """One request for the worker, already validated by the daemon."""

    TYPE: ClassVar[str] = "generate"
    request_id: str  # the daemon's own, new at each dispatch
    prompt: str | None = None
    # {role, content}; a role "tool" message also has tool_call_id, an assistant's may have tool_calls
    messages: tuple[dict[str, Any], ...] | None = None
    params: Sampling = field(default_factory=Sampling)
    deadline_ms: int | None = None  # what remains of the client's deadline

    @classmethod
    def of(cls, request_id: str, prompt: str | None = None, messages: Any = None, **sampling: Any) -> Generate:
        """A request with its sampling fields given flat (``stop`` as any sequence): for engines driven directly."""
        if "stop" in sampling:
            sampling["stop"] = tuple(sampling["stop"])
        chat = None if messages is None else tuple(messages)
        return cls(request_id=request_id, prompt=prompt, messages=chat, params=Sampling(**sampling))


@dataclass(frozen=True, kw_only=True)
class Embed(Message):
    """An embed request for an embedding engine, already validated by the daemon: exactly one of ``texts``
    (strings, tokenized by the engine) and ``token_arrays`` (token ids as they are)."""

    TYPE: ClassVar[str] = "embed"
    request_id: str
    texts: tuple[str, ...] | None = None
    token_arrays: tuple[tuple[int, ...], ...] | None = None
    deadline_ms: int | None = None

    @property
    def inputs(self) -> tuple[str, ...] | tuple[tuple[int, ...], ...]:
        return self.texts if self.texts is not None else self.token_arrays or ()


@dataclass(frozen=True, kw_only=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    request_id: str


@dataclass(frozen=True, kw_only=True)
class Shutdown(Message):
    """Finish nothing more; exit."""

    TYPE: ClassVar[str] = "shutdown"


@dataclass(frozen=True, kw_only=True)
class DaemonHeartbeat(Message):
    """The daemon is alive (on the watchdog socket)."""

    TYPE: ClassVar[str] = "heartbeat"


WORKER_MESSAGES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, Loading, Ready, LoadFailed, Failed, Heartbeat, Token, Done, Embeddings, GenerateError)
}
DAEMON_MESSAGES: dict[str, type[Message]] = {cls.TYPE: cls for cls in (Load, Generate, Embed, Cancel, Shutdown)}


def read_message(table: dict[str, type[Message]], message: dict[str, Any]) -> Message:
    """The typed form of a decoded message, by its ``type``; ProtocolError when unknown or malformed."""
    kind = message.get("type")
    cls = table.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"type: unknown message type {kind!r}"[:200])
    return cls.from_wire(message, kind)
