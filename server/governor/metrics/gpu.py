"""NVML GPU metrics as a prometheus-client custom collector, read in a background thread.

NVML calls can block in the driver (a GPU falling off the bus, a wedged driver), and the collector's
`collect()` runs on the event loop during a /metrics scrape. So a dedicated thread reads the GPUs every
`interval` seconds from `start()` (the app's startup, or the first scrape) until `close()`, and a scrape
only renders the last reading with its age: it never waits on NVML, and a reading older than
`stale_after` marks its GPU down. The thread owes nothing to the event loop (a loop busy relaying
streams does not delay it) and does not stop between scrapes: an earlier version stopped after 300 s
without a scrape, so a lone scrape after a quiet spell (the H200 run's final scrape) found a reading
~50 s old and called a healthy GPU down, with no error to say why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from governor.metrics.nvml_reader import (
    HUNG_ERROR,
    INIT_RETRY_S,
    READER_ERROR,
    REINIT_BACKOFF_S,
    THROTTLE_REASONS,
    GpuReading,
    NvmlReader,
    Round,
)

logger = logging.getLogger(__name__)

_Family = GaugeMetricFamily | CounterMetricFamily

READ_INTERVAL_S = 1.0
"""How often the background thread reads every GPU (about ten NVML calls per GPU: negligible)."""

STALE_AFTER_S = 10.0
"""A GPU whose last reading is older than this is reported down (its reader is stuck in NVML)."""

CLOSE_TIMEOUT_S = 1.0
"""close() waits this long for the reader; one stuck in the driver is left behind (a daemon thread)."""

EFFICIENCY_MIN_WINDOW_S = 1.0
"""Tokens per joule is only recomputed over windows at least this long; shorter ones are noise."""

GPU_LABELS = ("gpu", "name", "uuid")

# family key -> (metric name, help, type); counters are named without `_total`, the client adds it.
FAMILIES: dict[str, tuple[str, str, str]] = {
    "available": (
        "governor_gpu_available",
        "1 if NVML is initialised and at least one GPU is up (read within the staleness bound), else 0.",
        "gauge",
    ),
    "up": (
        "governor_gpu_up",
        "1 if the GPU's last reading succeeded and is recent, 0 if the GPU is lost, failing or its reading stale;"
        " a GPU once seen keeps this series.",
        "gauge",
    ),
    "reading_age": (
        "governor_gpu_reading_age_seconds",
        "Age of the GPU's last reading (successful or not) served by this scrape; read in the background.",
        "gauge",
    ),
    "errors": (
        "governor_gpu_errors",
        "NVML calls about one GPU that failed, by error (NVML error name in snake case, hung or other);"
        " reader_failed counts reading rounds that failed as a whole; gpu is empty for NVML-level calls"
        " (a hung init) and for a round that failed before any GPU was known.",
        "counter",
    ),
    "utilization": (
        "governor_gpu_utilization_ratio",
        "Fraction of the last NVML sample period during which a kernel ran on the GPU (0..1).",
        "gauge",
    ),
    "memory_utilization": (
        "governor_gpu_memory_utilization_ratio",
        "Fraction of the last NVML sample period during which device memory was read or written (0..1).",
        "gauge",
    ),
    "memory_used": ("governor_gpu_memory_used_bytes", "Device memory in use, in bytes.", "gauge"),
    "memory_total": ("governor_gpu_memory_total_bytes", "Total device memory, in bytes.", "gauge"),
    "temperature": ("governor_gpu_temperature_celsius", "GPU core temperature, in degrees Celsius.", "gauge"),
    "power": ("governor_gpu_power_watts", "Current power draw of the GPU board, in watts.", "gauge"),
    "power_limit": ("governor_gpu_power_limit_watts", "Enforced power limit of the GPU board, in watts.", "gauge"),
    "energy": (
        "governor_gpu_energy_joules",
        "Energy consumed by the GPU since the driver was loaded, in joules.",
        "counter",
    ),
    "clock_sm": ("governor_gpu_clock_sm_hertz", "Current SM clock, in hertz.", "gauge"),
    "clock_memory": ("governor_gpu_clock_memory_hertz", "Current memory clock, in hertz.", "gauge"),
    "throttle": (
        "governor_gpu_throttle_reasons",
        "1 for each clocks-event (throttle) reason currently active on the GPU, 0 otherwise.",
        "gauge",
    ),
    "tokens_per_joule": (
        "governor_gpu_output_tokens_per_joule",
        "Output tokens generated per joule consumed by all GPUs, over the window between recent scrapes;"
        " 0 until known.",
        "gauge",
    ),
}


@dataclass(frozen=True)
class _Baseline:
    at: float
    tokens: float
    energy_j: dict[int, float]


class GpuCollector(Collector):
    """Prometheus collector serving the background reader's last NVML reading; never blocks on NVML.

    `output_tokens` returns the total output tokens generated so far (monotonic); with the summed GPU
    energy it gives `governor_gpu_output_tokens_per_joule`. It is called from `collect()` only (the
    gateway's counters belong to the event loop). `nvml` replaces the `pynvml` module (tests), `clock`
    replaces `time.monotonic` for reading times and ages; `interval` and `stale_after` are the reader's
    period and the age past which a GPU is down.
    """

    def __init__(
        self,
        output_tokens: Callable[[], float],
        *,
        nvml: ModuleType | Any | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = READ_INTERVAL_S,
        stale_after: float = STALE_AFTER_S,
        init_retry: float = INIT_RETRY_S,
        reinit_backoff: tuple[float, float] = REINIT_BACKOFF_S,
    ) -> None:
        self._output_tokens = output_tokens
        self._clock = clock
        self.interval = interval
        self.stale_after = stale_after
        self._reader = NvmlReader(nvml, clock, self._set_busy, init_retry=init_retry, reinit_backoff=reinit_backoff)
        self._lock = threading.Lock()  # guards what the reader publishes; never held across an NVML call
        self._thread: threading.Thread | None = None
        self.thread_name = f"governor-gpu-reader-{id(self):x}"  # tells this collector's reader apart (tests, py-spy)
        self._stop = threading.Event()
        self._round: Round | None = None
        self._rounds = 0
        self._busy: tuple[float, int | None] | None = None  # (since, gpu) of the calls in flight
        self._hung_since: float | None = None  # the busy episode already counted as hung
        self._errors: dict[tuple[str, str], int] = {}
        self._baseline: _Baseline | None = None
        self._tokens_per_joule = 0.0

    @property
    def rounds(self) -> int:
        """Completed reading rounds since construction (lets tests wait for a reading, not a time)."""
        return self._rounds

    def readings_up(self) -> list[GpuReading]:
        """The last reading of each GPU that is up (read, and recent), as /metrics shows them; empty while
        NVML is unavailable. For the status page: it reads this without rendering every family."""
        self.start()
        now = self._clock()
        with self._lock:
            last = self._round
        if last is None or not last.nvml_ok:
            return []
        return [r for r in last.readings if r.up and now - r.at <= self.stale_after]

    def describe(self) -> Iterator[Metric]:
        """Declare every family without touching NVML (called at registration)."""
        yield from _new_families().values()

    def collect(self) -> Iterator[Metric]:
        """Render the last reading; starts the reader when none runs. Never waits on NVML."""
        self.start()
        families = _new_families()
        now = self._clock()
        with self._lock:
            self._note_hung(now)
            last = self._round
            errors = dict(self._errors)
        up_energy: dict[int, float] = {}
        any_up = False
        for reading in last.readings if last else ():
            age = max(0.0, now - reading.at)
            up = reading.up and age <= self.stale_after
            families["up"].add_metric(reading.gpu.labels, 1.0 if up else 0.0)
            families["reading_age"].add_metric(reading.gpu.labels, age)
            if up:
                any_up = True
                _add_values(families, reading)
                if "energy" in reading.values:
                    up_energy[reading.gpu.index] = reading.values["energy"]
        for (gpu, error), count in sorted(errors.items()):
            families["errors"].add_metric([gpu, error], float(count))
        available = last is not None and last.nvml_ok and any_up
        families["available"].add_metric([], 1.0 if available else 0.0)
        if available and last is not None:
            families["tokens_per_joule"].add_metric([], self._update_efficiency(last.at, up_energy))
        yield from families.values()

    def start(self) -> None:
        """Start the reader unless one runs (startup and every scrape call this, so a reader that died is
        replaced). At most one is ever in flight: one stuck in the driver is alive and keeps its place, and
        no second thread piles up behind it."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._stop,), name=self.thread_name, daemon=True)
            self._thread.start()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the reader and release NVML; a later scrape starts again. Waits at most `timeout`."""
        with self._lock:
            thread, stop = self._thread, self._stop
        if thread is None:
            return
        stop.set()
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("GPU reader still inside an NVML call after %.1fs; left behind", timeout)

    def _run(self, stop: threading.Event) -> None:
        try:
            while True:
                self._publish(self._read_round())
                if stop.wait(self.interval):
                    return
        finally:
            self._reader.shutdown()
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
                if not stop.is_set():  # killed by a BaseException: the next scrape starts another; say so
                    self._errors[("", READER_ERROR)] = self._errors.get(("", READER_ERROR), 0) + 1

    def _read_round(self) -> Round:
        # A round that raises (a bug, a binding that does not match the driver) is published as every GPU
        # down with the failure counted, and the next round tries again: the thread never dies of it and
        # never leaves a reading to go stale without a word.
        try:
            return self._reader.read()
        except Exception as exc:
            # Keyed by type: a message carrying per-round details must not log once a second.
            self._reader.log_once(
                ("round", type(exc).__name__), logging.ERROR, "GPU reading failed error=%r", exc, trace=True
            )
            return self._reader.failed_round()

    def _publish(self, result: Round) -> None:
        with self._lock:
            self._round = result
            self._rounds += 1
            for key in result.errors:
                self._errors[key] = self._errors.get(key, 0) + 1

    def _set_busy(self, gpu: int | None, done: bool) -> None:
        busy = None if done else (self._clock(), gpu)
        with self._lock:
            self._busy = busy

    def _note_hung(self, now: float) -> None:
        """Count a call that has outlived the staleness bound, once per stuck call (lock held)."""
        busy = self._busy
        if busy is None or now - busy[0] <= self.stale_after or self._hung_since == busy[0]:
            return
        self._hung_since = busy[0]
        gpu = "" if busy[1] is None else str(busy[1])
        logger.warning("NVML call hung gpu=%s for_s=%.1f", gpu or "none", now - busy[0])
        # Counted for NVML-level calls too (gpu=""): a hung init otherwise left available 0 with no error.
        self._errors[(gpu, HUNG_ERROR)] = self._errors.get((gpu, HUNG_ERROR), 0) + 1

    def _update_efficiency(self, at: float, energy_j: dict[int, float]) -> float:
        """Tokens per joule between the baseline and the reading taken `at` (tokens counted at this scrape)."""
        if not energy_j:
            return self._tokens_per_joule
        try:
            tokens = float(self._output_tokens())
        except Exception as exc:
            logger.warning("output token count failed error=%r", exc)
            return self._tokens_per_joule
        current = _Baseline(at, tokens, energy_j)
        base = self._baseline
        # A different set of GPUs reporting energy would make the sums incomparable: restart the window.
        if base is None or base.energy_j.keys() != energy_j.keys():
            self._baseline = current
            return self._tokens_per_joule
        if at - base.at < EFFICIENCY_MIN_WINDOW_S:
            return self._tokens_per_joule
        d_joules = sum(energy_j[i] - base.energy_j[i] for i in energy_j)
        d_tokens = tokens - base.tokens
        if d_joules < 0 or d_tokens < 0:  # counter reset (driver reload, engine restart)
            self._baseline = current
        elif d_joules > 0:  # NVML energy updates in steps; an unchanged counter just widens the window
            self._tokens_per_joule = d_tokens / d_joules
            self._baseline = current
        return self._tokens_per_joule


def _add_values(families: dict[str, _Family], reading: GpuReading) -> None:
    labels = reading.gpu.labels
    for key, value in reading.values.items():
        families[key].add_metric(labels, value)
    if reading.throttle is not None:
        for reason, bit in THROTTLE_REASONS:
            families["throttle"].add_metric([*labels, reason], 1.0 if reading.throttle & bit else 0.0)


def _new_families() -> dict[str, _Family]:
    families: dict[str, _Family] = {}
    for key, (name, documentation, kind) in FAMILIES.items():
        if key in ("available", "tokens_per_joule"):
            labels: list[str] = []
        elif key == "throttle":
            labels = [*GPU_LABELS, "reason"]
        elif key == "errors":
            labels = ["gpu", "error"]
        else:
            labels = list(GPU_LABELS)
        family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        families[key] = family_type(name, documentation, labels=labels)
    return families
