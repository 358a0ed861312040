"""Gateway metrics: one registry per app (no module globals), bounded label values."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from governor.engine.base import EngineClient, EngineState
from governor.metrics.families import Families
from governor.metrics.model_server import Flights

# Latency buckets sized for LLM serving: TTFT from ~5 ms (GPU, short prompt) to minutes (queued on CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)
OTHER = "other"


class GatewayMetrics:
    """Counters and histograms the gateway updates per request (fast families), plus a prometheus_client
    registry for the collectors read at scrape time (engines, GPU, adapters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.families = f = Families()
        labels = ("model", "endpoint")
        self.requests = f.counter(
            "governor_requests",
            "Requests finished, by model or adapter, endpoint and HTTP status.",
            (*labels, "status"),
        )
        self.in_flight = f.gauge("governor_requests_in_flight", "Requests being served now.").labels()
        self.latency = f.histogram(
            "governor_request_duration_seconds", "End-to-end request latency.", labels, LATENCY_BUCKETS
        )
        self.ttft = f.histogram(
            "governor_time_to_first_token_seconds",
            "Time from request to the first generated token.",
            labels,
            TTFT_BUCKETS,
        )
        self.prompt_tokens = f.counter("governor_prompt_tokens", "Prompt tokens processed.", ("model",))
        self.output_tokens = f.counter("governor_output_tokens", "Output tokens generated.", ("model",))
        self.loops_cut = f.counter("governor_loops_detected", "Generations cut because they looped.", ("model",))
        self.stream_errors = f.counter(
            "governor_stream_errors", "Responses that failed after they started, by reason.", ("reason",)
        )
        self.relayed = f.counter(
            "governor_relayed_requests",
            "Requests sent to an engine, by the process relaying them (0: the owner; 1 and up: relay workers).",
            ("worker",),
        )
        self._known: Callable[[], Iterable[str]] = lambda: ()
        # Requests admitted to an engine, waiting or running, per adapter: the model-server series.
        self.flights = Flights()

    def bound_labels(self, known: Callable[[], Iterable[str]]) -> None:
        """Only names from `known` (base model + registered adapters) get their own label value."""
        self._known = known

    def model_label(self, name: str) -> str:
        return name if name in set(self._known()) else OTHER

    def stream_error(self, reason: str) -> None:
        """Counts one failed response; `reason` is one of the relay's fixed set (bounded)."""
        self.stream_errors.labels(reason).inc()

    def total_output_tokens(self) -> float:
        return sum(series.value for _, series in self.output_tokens.series())

    def render(self) -> bytes:
        """The gateway's own exposition (text format 0.0.4)."""
        return self.families.render() + generate_latest(self.registry)


class EngineCollector(Collector):
    """Engine up/restart state, read from the engines at scrape time."""

    def __init__(self, engines: Callable[[], list[EngineClient]]) -> None:
        self._engines = engines

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily("governor_engine_up", "1 when the engine answers and generates.", labels=["engine"])
        yield CounterMetricFamily("governor_engine_restarts", "Engine restarts by the supervisor.", labels=["engine"])
        yield GaugeMetricFamily(
            "governor_engine_outstanding_requests", "Requests the gateway has in flight per engine.", labels=["engine"]
        )

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("governor_engine_up", "1 when the engine answers and generates.", labels=["engine"])
        restarts = CounterMetricFamily(
            "governor_engine_restarts", "Engine restarts by the supervisor.", labels=["engine"]
        )
        outstanding = GaugeMetricFamily(
            "governor_engine_outstanding_requests", "Requests the gateway has in flight per engine.", labels=["engine"]
        )
        for engine in self._engines():
            up.add_metric([engine.name], 1.0 if engine.state == EngineState.READY else 0.0)
            restarts.add_metric([engine.name], float(getattr(engine, "restarts", 0)))
            outstanding.add_metric([engine.name], float(engine.outstanding))
        yield up
        yield restarts
        yield outstanding
