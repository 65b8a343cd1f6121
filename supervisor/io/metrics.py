"""The Prometheus exposition of what the core counts (docs/METRICS.md lists every metric).

A custom collector reads the engines' state when a scrape asks for it: the
figures in core/stats.py, the queues, the workers, the circuit breakers.  It
writes nothing, and it runs on the event loop's thread (the loopback server
in io/metrics_server.py and any HTTP front serve from the loop), so it never
sees the core half-way through a change.  ``MetricsExporter.render`` is the
whole interface for whoever serves ``/metrics``.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..core.engines import Engines, EngineState
from ..core.lifecycle import WorkerState
from ..core.policy import Circuit
from ..core.stats import Histogram
from ..planning.measure.gpu import GpuSnapshot
from ..planning.measure.inputs import STATUS_SNAPSHOT_AGE_S, Planning, worker_gpu_bytes
from .worker_process import WorkerProcess

# Prometheus reserves colons for recording rules, so vLLM's "vllm:" becomes this.
PREFIX = "node_supervisor_"
ENGINE = ["engine"]


def _name(name: str) -> str:
    return PREFIX + name


def _histogram(name: str, documentation: str, engines: list[EngineState], pick: Any) -> HistogramMetricFamily:
    family = HistogramMetricFamily(_name(name), documentation, labels=ENGINE)
    for engine in engines:
        histogram: Histogram = pick(engine)
        buckets = [(floatToGoString(bound), count) for bound, count in histogram.cumulative()]
        family.add_metric([engine.name], buckets, histogram.sum)
    return family


def _per_engine(family: Metric, engines: list[EngineState], value: Any) -> Metric:
    for engine in engines:
        family.add_metric([engine.name], value(engine))  # type: ignore[attr-defined]
    return family


def _tally(family: Metric, rows: Iterable[tuple[str, dict[str, int]]]) -> Metric:
    """A counter by engine and one more label, from each engine's tally."""
    for engine, tally in rows:
        for key, count in sorted(tally.items()):
            family.add_metric([engine, key], count)  # type: ignore[attr-defined]
    return family


class NodeCollector(Collector):
    """Every engine's figures, read at scrape time."""

    def __init__(
        self, engines: Engines, planning: Planning | None = None, processes: dict[str, WorkerProcess] | None = None
    ) -> None:
        self.engines = engines
        self.planning = planning  # GPU memory per worker, when the node has a GPU probe
        self.processes = processes if processes is not None else {}

    def collect(self) -> Iterator[Metric]:
        engines = list(self.engines)
        yield from self._requests(engines)
        yield from self._latency(engines)
        yield from self._tokens_and_cost(engines)
        yield from self._health(engines)
        yield from self._residency(engines)
        if self.planning is not None:
            yield self._gpu_memory(engines, self.planning.snapshot(STATUS_SNAPSHOT_AGE_S))

    def _requests(self, engines: list[EngineState]) -> Iterator[Metric]:
        yield _per_engine(
            GaugeMetricFamily(_name("num_requests_running"), "Client requests being generated now.", labels=ENGINE),
            engines,
            EngineState.in_flight,
        )
        yield _per_engine(
            GaugeMetricFamily(
                _name("num_requests_waiting"), "Client requests waiting in the engine's queue.", labels=ENGINE
            ),
            engines,
            EngineState.waiting,
        )
        yield _tally(
            CounterMetricFamily(
                _name("request_success_total"),
                "Requests that ended with a done event, by finish reason.",
                labels=["engine", "finished_reason"],
            ),
            ((e.name, e.stats.finished) for e in engines),
        )
        yield _tally(
            CounterMetricFamily(
                _name("request_errors_total"),
                "Requests that ended with an error event, by error code.",
                labels=["engine", "code"],
            ),
            ((e.name, e.stats.errors) for e in engines),
        )
        refused = [*((e.name, e.stats.refused) for e in engines), ("", self.engines.refused_unrouted)]
        yield _tally(
            CounterMetricFamily(
                _name("requests_refused_total"),
                "Generate ops refused on arrival, by error code (engine empty: none chosen).",
                labels=["engine", "code"],
            ),
            refused,
        )

    def _latency(self, engines: list[EngineState]) -> Iterator[Metric]:
        yield _histogram("time_to_first_token_seconds", "Arrival to first token.", engines, lambda e: e.stats.ttft)
        yield _histogram(
            "inter_token_latency_seconds", "Time between tokens of a request.", engines, lambda e: e.stats.inter_token
        )
        yield _histogram(
            "e2e_request_latency_seconds",
            "Arrival to the request's end, whatever the end.",
            engines,
            lambda e: e.stats.e2e,
        )
        yield _histogram(
            "request_queue_time_seconds",
            "Arrival to dispatch to the worker (the last one, if retried).",
            engines,
            lambda e: e.stats.queue,
        )

    def _tokens_and_cost(self, engines: list[EngineState]) -> Iterator[Metric]:
        counters = (
            (
                "prompt_tokens_total",
                "Prompt tokens of ended requests (the worker's count).",
                lambda e: e.stats.tokens.prompt,
            ),
            ("generation_tokens_total", "Generated tokens of ended requests.", lambda e: e.stats.tokens.completion),
            (
                "cost_total",
                "Money spent on the engine since the daemon started, at its configured prices.",
                lambda e: e.stats.spent,
            ),
        )
        for name, documentation, value in counters:
            yield _per_engine(CounterMetricFamily(_name(name), documentation, labels=ENGINE), engines, value)
        gauges = (
            (
                "prompt_tokens_today",
                "Prompt tokens today (the daemon's local date).",
                lambda e: e.stats.tokens_today.prompt,
            ),
            ("generation_tokens_today", "Generated tokens today.", lambda e: e.stats.tokens_today.completion),
            ("cost_today", "Money spent on the engine today.", lambda e: e.stats.spent_today),
            (
                "budget_exhausted",
                "1 while the engine's daily budget is spent (it takes no traffic).",
                lambda e: int(e.budget_exhausted),
            ),
        )
        for name, documentation, value in gauges:
            yield _per_engine(GaugeMetricFamily(_name(name), documentation, labels=ENGINE), engines, value)
        budgeted = [e for e in engines if e.config.daily_budget is not None]
        yield _per_engine(
            GaugeMetricFamily(_name("daily_budget"), "The engine's configured daily budget.", labels=ENGINE),
            budgeted,
            lambda e: e.config.daily_budget,
        )

    def _health(self, engines: list[EngineState]) -> Iterator[Metric]:
        yield _tally(
            CounterMetricFamily(
                _name("worker_restarts_total"),
                "Worker starts after an exit nobody asked for, by cause.",
                labels=["engine", "cause"],
            ),
            ((e.name, e.stats.restarts) for e in engines),
        )
        circuit = GaugeMetricFamily(
            _name("circuit_state"), "The engine's circuit breaker: 1 for its current state.", labels=["engine", "state"]
        )
        info = GaugeMetricFamily(
            _name("engine_info"), "Each engine's kind and model (always 1).", labels=["engine", "kind", "model"]
        )
        up = GaugeMetricFamily(
            _name("engine_up"),
            "1 while the engine takes traffic (0: unavailable, model missing, circuit open, budget spent).",
            labels=ENGINE,
        )
        ready = GaugeMetricFamily(
            _name("engine_ready"), "1 while the engine can generate now (a worker ready).", labels=ENGINE
        )
        for engine in engines:
            for state in Circuit:
                circuit.add_metric([engine.name, state.value], int(engine.circuit is state))
            up.add_metric([engine.name], int(engine.refusal is None))
            ready.add_metric([engine.name], int(engine.refusal is None and engine.worker.state is WorkerState.READY))
            info.add_metric([engine.name, engine.config.kind, engine.model_path], 1)
        yield circuit
        yield up
        yield ready
        yield info

    def _residency(self, engines: list[EngineState]) -> Iterator[Metric]:
        loaded = GaugeMetricFamily(_name("models_loaded"), "Models loaded now (engines whose worker is ready).")
        loaded.add_metric([], sum(e.worker.state is WorkerState.READY for e in engines))
        yield loaded
        yield _tally(
            CounterMetricFamily(
                _name("model_loads_total"),
                "Model loads started, by reason (demand, requested, warm, restart).",
                labels=["engine", "reason"],
            ),
            ((e.name, e.residency.loads) for e in engines),
        )
        yield _tally(
            CounterMetricFamily(
                _name("model_unloads_total"),
                "Models unloaded, by reason (idle, evicted, requested, reload, failed).",
                labels=["engine", "reason"],
            ),
            ((e.name, e.residency.unloads) for e in engines),
        )
        yield _histogram(
            "model_load_seconds", "Worker start to model loaded.", engines, lambda e: e.residency.load_time
        )

    def _gpu_memory(self, engines: list[EngineState], snapshot: GpuSnapshot) -> Metric:
        family = GaugeMetricFamily(
            _name("worker_gpu_memory_bytes"),
            "GPU memory a worker process holds, as NVML reports it.",
            labels=["engine", "worker"],
        )
        for engine in engines:
            process = self.processes.get(engine.worker.worker_id) if engine.worker.alive else None
            used = worker_gpu_bytes(snapshot, process.pid if process else None)
            if used is not None:
                family.add_metric([engine.name, engine.worker.worker_id], used)
        return family


class MetricsExporter:
    """The node's registry: its own collector, and the process's standard ones."""

    def __init__(self, collector: NodeCollector) -> None:
        self.registry = CollectorRegistry()
        for standard in (ProcessCollector, PlatformCollector, GCCollector):
            standard(registry=self.registry)
        self.registry.register(collector)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for a scrape with this Accept header: (body, Content-Type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
