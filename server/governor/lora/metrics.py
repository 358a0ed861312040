"""Adapter metrics: load/unload/eviction counters, load time, and adapters per state at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from governor.lora.adapter import AdapterState

# Hot loads take ~0.1-1 s on CPU; a cold engine or a big adapter on a busy GPU can take tens of seconds.
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_GAUGE = ("governor_adapters", "Registered adapters by state.")
_WAITING = ("governor_adapter_requests_waiting", "Requests waiting for their adapter to be loaded into the engines.")


class AdapterMetrics(Collector):
    """One collector for the registry's metrics, so a CollectorRegistry takes it with one register()."""

    def __init__(self, states: Callable[[], Iterable[AdapterState]], waiting: Callable[[], int] = lambda: 0) -> None:
        self._states = states
        self._waiting = waiting
        # registry=None: these are exposed through this collector, not registered globally.
        self.loads = Counter(
            "governor_adapter_loads", "Adapter loads by result (ok|failed).", ["result"], registry=None
        )
        self.unloads = Counter(
            "governor_adapter_unloads", "Adapter unloads by reason (api|removed|evicted|replaced).", ["reason"],
            registry=None,
        )  # fmt: skip
        self.evictions = Counter("governor_adapter_evictions", "Adapters evicted to make room (LRU).", registry=None)
        self.load_seconds = Histogram(
            "governor_adapter_load_seconds", "Time to validate and load an adapter on the engines.",
            buckets=LOAD_BUCKETS, registry=None,
        )  # fmt: skip

    def _gauge(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(*_GAUGE, labels=["state"])

    def _waiting_gauge(self, value: float | None = None) -> GaugeMetricFamily:
        return GaugeMetricFamily(*_WAITING, value=value)

    def describe(self) -> Iterator[Metric]:
        for metric in (self.loads, self.unloads, self.evictions, self.load_seconds):
            yield from metric.describe()
        yield self._gauge()
        yield self._waiting_gauge()

    def collect(self) -> Iterator[Metric]:
        for metric in (self.loads, self.unloads, self.evictions, self.load_seconds):
            yield from metric.collect()
        counts = dict.fromkeys(AdapterState, 0)
        for state in self._states():
            counts[state] += 1
        gauge = self._gauge()
        for state, count in counts.items():
            gauge.add_metric([state.value], count)
        yield gauge
        yield self._waiting_gauge(self._waiting())
