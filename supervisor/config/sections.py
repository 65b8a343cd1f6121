"""The tables inside the settings: one engine (and a remote engine's upstream), supervision, GPU planning, one environment, security, metrics, HTTP."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENGINE_KINDS = ("llamacpp", "exllamav2", "fake", "openai")
REMOTE_KINDS = ("openai",)  # engines that forward to an upstream server: no model file, no GPU, no plan
EMBEDDING_KINDS = ("llamacpp", "fake")  # engines that can load a model in embedding mode
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# KV cache types, largest first (llama.cpp's names; the planner maps them for ExLlamaV2).
KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")
CacheType = Literal["f16", "q8_0", "q4_0"]
DEFAULT_KEEP_ALIVE_S = 300.0  # an idle model loaded on demand stays this long (Ollama's default)


class UpstreamConfig(BaseModel):
    """``[engines.<name>.upstream]``: the OpenAI-compatible server a remote engine (kind ``openai``) forwards to.

    The API key is never part of the configuration: ``api_key_env`` names the
    environment variable that holds it, which the worker reads.
    """

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="the API root the upstream serves, e.g. http://10.0.0.5:8000/v1")
    model: str | None = Field(
        None, min_length=1, max_length=256, description="the upstream's model name; unset: the first it lists"
    )
    api_key_env: str | None = Field(
        None, pattern=ENV_NAME_PATTERN, description="environment variable holding the API key; unset: none sent"
    )
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    read_timeout_s: float = Field(30.0, gt=0, le=3600, description="the longest wait for the upstream's next bytes")
    send_top_k: bool = Field(
        False, description="pass top_k on (vLLM, llama-server, Ollama take it; OpenAI's API does not)"
    )

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
            raise ValueError("must be an http:// or https:// URL, e.g. http://10.0.0.5:8000/v1")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold credentials: name the variable holding the key in api_key_env")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment: paths are appended to it")
        return value.rstrip("/")


class EngineConfig(BaseModel):
    """One named engine instance: ``[engines.<name>]``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["llamacpp", "exllamav2", "fake", "openai"]
    model: Path | Annotated[list[Path], Field(min_length=1)] | None = Field(
        None, description="model path, or a list of them (variants, best first); unset: the default model"
    )
    n_ctx: int = Field(2048, gt=0, le=1 << 20, description="context of one request")
    parallel: int = Field(
        1,
        ge=1,
        le=64,
        description="requests one worker generates at once (llama.cpp: sequences in one context, batched decode)",
    )
    n_threads: int | None = Field(
        None, gt=0, le=1024, description="llama.cpp threads for generation; unset: the physical cores"
    )
    n_threads_batch: int | None = Field(
        None, gt=0, le=1024, description="llama.cpp threads for prompts; unset: n_threads"
    )
    n_batch: int | None = Field(
        None,
        gt=0,
        le=1 << 20,
        description="llama.cpp tokens per decode call; unset: 2048 with layers on a GPU, else 512",
    )
    n_ubatch: int | None = Field(None, gt=0, le=1 << 20, description="llama.cpp micro-batch; unset: 512")
    flash_attn: bool | None = Field(
        None, description='llama.cpp flash attention; unset: "auto" with layers on a GPU, else off'
    )
    n_gpu_layers: Annotated[int, Field(ge=-1)] | Literal["auto"] = Field(
        "auto", description='layers on the GPU; -1 all; "auto": planned'
    )
    cache_type: CacheType = Field("f16", description="KV cache type the planner tries first")
    cache_types_allowed: list[CacheType] = Field(
        default_factory=list, description="smaller KV cache types the planner may step down to"
    )
    chat_format: str | None = None
    priority: int = Field(100, description="lower is preferred when a request names no engine")
    standby: Literal["warm", "cold"] = Field(
        "warm", description="warm: started with the daemon; cold: started when traffic needs it"
    )
    slo_ttft_ms: float | None = Field(None, gt=0, description="p95 time to first token objective")
    slo_per_token_ms: float | None = Field(None, gt=0, description="p95 per-token time objective")
    max_queue: int = Field(16, ge=0, le=100_000)
    env: str | None = Field(None, description="name of the virtual environment; default: the kind")
    options: dict[str, Any] = Field(default_factory=dict, description="passed through to the engine")
    # Accounting (docs/METRICS.md): currency-neutral prices, meant for engines that are paid per token.
    price_input_per_mtok: float = Field(0.0, ge=0, allow_inf_nan=False, description="price of a million prompt tokens")
    price_output_per_mtok: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="price of a million generated tokens"
    )
    daily_budget: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="spent today at or past this: unpinned requests go to the next engine until the day turns",
    )
    aliases: list[Annotated[str, Field(pattern=r"^\S{1,128}$")]] = Field(
        default_factory=list, description="other names the HTTP front's `model` field accepts for this engine"
    )
    upstream: UpstreamConfig | None = Field(None, description="kind openai: the server it forwards to")
    # Residency (docs/CONFIG.md, "Many models on one node").
    keep_alive: float | None = Field(
        None,
        allow_inf_nan=False,
        description="seconds an idle loaded model stays; 0: unload after each request; negative: never; "
        'unset: 300 for standby "cold", never for "warm"',
    )
    pinned: bool = Field(False, description="never evicted to make room for another model")
    exclusive: bool = Field(False, description="loading it stops every other GPU engine first (one at a time)")
    on_no_room: Literal["step_down", "wait", "fail"] = Field(
        "step_down", description="no room on any GPU after evicting idle models: smaller load, wait, or fail"
    )
    gpu_mib: int | None = Field(
        None, gt=0, description="GPU memory a load needs where the model has no facts to plan with"
    )
    split: Literal["auto", "never"] = Field(
        "auto",
        description='"auto": a model that fits on no single GPU is split across several, in proportion to their '
        'room; "never": one GPU only (a smaller load, or on_no_room)',
    )
    # Embedding mode (docs/CONFIG.md, "Embeddings"): the engine serves embed ops and /v1/embeddings, not generate.
    embedding: bool = Field(False, description="load the model in embedding mode: embed ops only, no generation")
    pooling: Literal["mean", "cls", "last"] | None = Field(
        None, description="how a sequence's token vectors become one; unset: the model's own, else mean"
    )
    normalize: bool = Field(True, description="embeddings scaled to unit length (L2)")

    @model_validator(mode="after")
    def _upstream_for_remote_kinds(self) -> "EngineConfig":
        if self.kind in REMOTE_KINDS and self.upstream is None:
            raise ValueError(f'upstream: required for kind "{self.kind}" (a table with base_url)')
        if self.kind not in REMOTE_KINDS and self.upstream is not None:
            raise ValueError(f'upstream: only for kind {" or ".join(REMOTE_KINDS)}, not "{self.kind}"')
        if self.kind in REMOTE_KINDS and self.model is not None:
            raise ValueError(
                f'model: a "{self.kind}" engine has no model file; the upstream\'s model is upstream.model'
            )
        if self.embedding and self.kind not in EMBEDDING_KINDS:
            raise ValueError(f'embedding: only kind {" or ".join(EMBEDDING_KINDS)} embeds, not "{self.kind}"')
        return self

    @property
    def env_name(self) -> str:
        return self.env or self.kind

    @property
    def is_remote(self) -> bool:
        """Forwards to an upstream server: nothing to load here, no model file, no GPU."""
        return self.kind in REMOTE_KINDS

    @property
    def keep_alive_s(self) -> float:
        """Seconds an idle loaded model stays; -1: for ever."""
        if self.keep_alive is None:
            return DEFAULT_KEEP_ALIVE_S if self.standby == "cold" else -1.0
        return -1.0 if self.keep_alive < 0 else self.keep_alive

    @property
    def uses_gpu(self) -> bool:
        """May it hold GPU memory ("auto" may)?  Such engines never load at the same time on one device."""
        return not self.is_remote and (self.kind == "exllamav2" or self.n_gpu_layers != 0)


class SupervisionConfig(BaseModel):
    """``[supervision]``: restarts, hang detection, circuit breaker, probes, latency switching."""

    model_config = ConfigDict(extra="forbid")

    restart_backoff_base_s: float = Field(1.0, gt=0)
    restart_backoff_cap_s: float = Field(30.0, gt=0)
    stable_after_s: float = Field(60.0, ge=0, description="healthy this long: the backoff starts over")
    hang_missed_heartbeats: int = Field(3, ge=2, le=100)
    stall_timeout_s: float = Field(30.0, gt=0, description="a request in flight with no token for this long: hang")
    load_stall_s: float = Field(120.0, gt=0, description="loading with no progress report for this long: hang")
    kill_grace_s: float = Field(2.0, ge=0, description="between SIGTERM and SIGKILL for a hung worker")
    circuit_failures: int = Field(3, ge=1)
    circuit_window_s: float = Field(60.0, gt=0)
    circuit_open_s: float = Field(30.0, gt=0, description="time before the half-open probe")
    probe_interval_s: float = Field(30.0, ge=0, description="idle workers get a one-token probe this often; 0: never")
    probe_timeout_s: float = Field(10.0, gt=0)
    latency_window_s: float = Field(60.0, gt=0)
    latency_min_samples: int = Field(3, ge=1)
    latency_hysteresis: float = Field(0.8, gt=0, le=1, description="recovered: p95 under objective x this")
    switch_breach_for_s: float = Field(10.0, ge=0)
    switch_min_dwell_s: float = Field(30.0, ge=0)


class GpuConfig(BaseModel):
    """``[gpu]``: how much of each GPU the planner may use; the node shares it."""

    model_config = ConfigDict(extra="forbid")

    reserve_mib: int = Field(0, ge=0, description="held back on every device for the node's other services")
    reserve_percent: float = Field(0.0, ge=0, lt=100, description="this share of each device's total is left free, too")
    safety_margin: float = Field(
        0.10, ge=0, le=1, description="added to every estimate: 0.10 plans 10 % more than estimated"
    )
    cuda_overhead_mib: int = Field(600, ge=0, description="CUDA context and allocator slack per process on a device")
    min_ctx: int = Field(512, gt=0, description="the planner never shrinks a context below this")
    min_residency_s: float = Field(
        30.0, ge=0, description="a model loaded this recently is not evicted for another (no thrashing)"
    )
    no_room_wait_s: float = Field(
        120.0, gt=0, description='on_no_room = "wait": requests wait this long for GPU memory, then fail'
    )


class EnvConfig(BaseModel):
    """``[envs.<name>]``: how one engine environment is built (by environment name)."""

    model_config = ConfigDict(extra="forbid")

    system_site_packages: bool = Field(
        False, description="see the node's own packages: a CUDA torch there is used, not installed again"
    )


class SecurityConfig(BaseModel):
    """``[security]``: who may connect.  tcp endpoints take CURVE keys; ipc endpoints file modes and a group.

    The paths left unset are filled in from ``state_dir`` by the settings (see docs/CONFIG.md).
    """

    model_config = ConfigDict(extra="forbid")

    keys_dir: Path | None = Field(
        None, description="the daemon's CURVE key pair and client key pairs; default <state_dir>/keys"
    )
    authorized_keys_dir: Path | None = Field(
        None, description="public key files of the clients tcp endpoints accept; default <keys_dir>/authorized"
    )
    server_key_file: Path | None = Field(
        None, description="the daemon's public key as a client checks it; default <keys_dir>/server.key"
    )
    client_key_file: Path | None = Field(
        None, description="the key pair this client presents; default <keys_dir>/clients/local.key_secret"
    )
    socket_group: str | None = Field(
        None, min_length=1, description="the group given the run directory and the ipc sockets; members may connect"
    )


def is_loopback(host: str) -> bool:
    """Only this machine can connect: localhost or a loopback address (a host name is not trusted to be one)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# "host:port" or "[ipv6]:port"; the port 0 means any free port (the log names the one bound).
_LISTEN = re.compile(r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]]+)):(?P<port>\d{1,5})$")


def split_listen(listen: str) -> tuple[str, int]:
    """(host, port) of an HTTP listen address; ValueError naming the expected form."""
    match = _LISTEN.match(listen)
    if match is None or int(match["port"]) > 65535:
        raise ValueError('must be "host:port" (or "[ipv6]:port") with a port of 0 to 65535')
    return match["ipv6"] or match["host"], int(match["port"])


class MetricsConfig(BaseModel):
    """``[metrics]``: the Prometheus exposition on a loopback port of its own (docs/METRICS.md)."""

    model_config = ConfigDict(extra="forbid")

    listen: str | None = Field(
        None, description='loopback "host:port" serving GET /metrics; port 0: any free port; unset: off'
    )

    @field_validator("listen")
    @classmethod
    def _loopback(cls, value: str | None) -> str | None:
        if value is not None and not is_loopback(split_listen(value)[0]):
            # The exposition has no access control: it names engines, models and spend.
            raise ValueError(
                "must be a loopback address (localhost, 127.0.0.0/8, ::1) with a port, e.g. 127.0.0.1:9464"
            )
        return value


class HttpConfig(BaseModel):
    """``[http]``: the OpenAI-compatible HTTP front (docs/HTTP.md); off unless ``listen`` is set."""

    model_config = ConfigDict(extra="forbid")

    listen: str | None = Field(None, description='"host:port" to serve HTTP on; unset: no HTTP front')
    api_keys_file: Path | None = Field(
        None, description="a file of bearer keys, one a line (# comments); required beyond loopback"
    )
    api_keys_env: list[Annotated[str, Field(pattern=ENV_NAME_PATTERN)]] = Field(
        default_factory=list, description="names of environment variables each holding one bearer key"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="a request's line and headers must arrive within this; then the connection closes",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a request's body must arrive within this after its headers"
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, le=3600, description="an idle kept-alive connection is closed after this"
    )
    max_connections: int = Field(512, ge=1, description="open HTTP connections; beyond: 503 with Retry-After")
    max_connections_per_client: int = Field(
        128, ge=1, description="open HTTP connections from one client address; beyond: 503 with Retry-After"
    )
    fd_reserve: int = Field(
        256,
        ge=16,
        description="file descriptors kept from HTTP for ZeroMQ, logs and workers: HTTP connections beyond"
        " RLIMIT_NOFILE less this are closed at once",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            split_listen(value)
        return value
