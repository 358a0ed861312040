"""NVML GPU metrics as a prometheus-client custom collector, read at scrape time."""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

_Family = GaugeMetricFamily | CounterMetricFamily

INIT_RETRY_S = 60.0
"""A failed NVML init is retried at most this often (a missing driver rarely appears later)."""

EFFICIENCY_MIN_WINDOW_S = 1.0
"""Tokens per joule is only recomputed over windows at least this long; shorter ones are noise."""

GPU_LABELS = ("gpu", "name", "uuid")

# Clocks-event ("throttle") reason bits. They are part of the NVML ABI and identical across
# drivers and pynvml versions; listing them here keeps the `reason` label a fixed, bounded set.
THROTTLE_REASONS: tuple[tuple[str, int], ...] = (
    ("gpu_idle", 0x1),
    ("applications_clocks", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal", 0x20),
    ("hw_thermal", 0x40),
    ("hw_power_brake", 0x80),
    ("display_clocks", 0x100),
)

# family key -> (metric name, help, type); counters are named without `_total`, the client adds it.
FAMILIES: dict[str, tuple[str, str, str]] = {
    "available": (
        "governor_gpu_available",
        "1 if NVML initialised and found at least one GPU, else 0.",
        "gauge",
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

# family key, NVML function, extra args after the handle, factor to the metric's base unit.
# Args are NVML enum values (ABI-stable): NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2.
SCALAR_FIELDS: tuple[tuple[str, str, tuple[int, ...], float], ...] = (
    ("temperature", "nvmlDeviceGetTemperature", (0,), 1.0),
    ("power", "nvmlDeviceGetPowerUsage", (), 1e-3),  # mW
    ("power_limit", "nvmlDeviceGetEnforcedPowerLimit", (), 1e-3),  # mW
    ("energy", "nvmlDeviceGetTotalEnergyConsumption", (), 1e-3),  # mJ
    ("clock_sm", "nvmlDeviceGetClockInfo", (1,), 1e6),  # MHz
    ("clock_memory", "nvmlDeviceGetClockInfo", (2,), 1e6),  # MHz
)


@dataclass(frozen=True)
class _Gpu:
    index: int
    name: str
    uuid: str
    handle: Any

    @property
    def labels(self) -> list[str]:
        return [str(self.index), self.name, self.uuid]


@dataclass(frozen=True)
class _Reading:
    at: float
    tokens: float
    energy_j: dict[int, float]


def _text(value: str | bytes) -> str:
    # pynvml < 11.5 returns bytes for names and UUIDs.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class GpuCollector(Collector):
    """Prometheus collector reading NVML at scrape time; reports `governor_gpu_available 0` without a GPU.

    `output_tokens` returns the total output tokens generated so far (monotonic); with the summed GPU
    energy it gives `governor_gpu_output_tokens_per_joule`. `nvml` replaces the `pynvml` module (tests),
    `clock` replaces `time.monotonic`.
    """

    def __init__(
        self,
        output_tokens: Callable[[], float],
        *,
        nvml: ModuleType | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._output_tokens = output_tokens
        self._nvml: Any = nvml
        self._clock = clock
        self._lock = threading.Lock()
        self._gpus: list[_Gpu] | None = None
        self._next_init_at: float | None = None
        self._logged: set[tuple[str, ...]] = set()
        self._baseline: _Reading | None = None
        self._tokens_per_joule = 0.0
        # NVML functions resolved once at init; ones this pynvml lacks are left out.
        self._scalars: list[tuple[str, Callable[..., Any], tuple[int, ...], float]] = []
        self._throttle_fn: Callable[..., Any] | None = None

    def describe(self) -> Iterator[Metric]:
        """Declare every family without touching NVML (called at registration)."""
        yield from _new_families().values()

    def collect(self) -> Iterator[Metric]:
        """Read every GPU once; a field NVML cannot report is skipped, never raised."""
        families = _new_families()
        with self._lock:
            now = self._clock()
            gpus = self._gpus if self._ensure_init(now) else None
            families["available"].add_metric([], 1.0 if gpus else 0.0)
            if gpus:
                energy_j: dict[int, float] = {}
                for gpu in gpus:
                    joules = self._sample(gpu, families)
                    if joules is not None:
                        energy_j[gpu.index] = joules
                families["tokens_per_joule"].add_metric([], self._update_efficiency(now, energy_j))
        yield from families.values()

    def close(self) -> None:
        """Release NVML; a later scrape initialises it again."""
        with self._lock:
            if self._gpus is not None:
                self._shutdown()
                self._gpus = None
                self._next_init_at = None

    def _ensure_init(self, now: float) -> bool:
        if self._gpus is not None:
            return True
        if self._next_init_at is not None and now < self._next_init_at:
            return False
        self._next_init_at = now + INIT_RETRY_S
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                self._log_once(("import",), logging.INFO, "GPU metrics disabled: pynvml not importable error=%s", exc)
                return False
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:  # any init failure must leave /metrics working, not just NVMLError
            self._log_once(
                ("init", str(exc)),
                logging.INFO,
                "GPU metrics disabled: NVML init failed error=%s retry_s=%d",
                exc,
                INIT_RETRY_S,
            )
            return False
        try:
            gpus = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(nvml.nvmlDeviceGetName(handle))
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                gpus.append(_Gpu(index, name, uuid, handle))
        except Exception as exc:
            self._log_once(
                ("enumerate", str(exc)), logging.WARNING, "GPU metrics disabled: listing GPUs failed error=%s", exc
            )
            self._shutdown()
            return False
        self._scalars = [
            (key, function, args, factor)
            for key, name, args, factor in SCALAR_FIELDS
            if (function := getattr(nvml, name, None)) is not None
        ]
        # The reasons call was renamed in NVML 12.2; older pynvml only has the throttle spelling.
        self._throttle_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        self._gpus = gpus
        logger.info("GPU metrics enabled: gpus=%d names=%s", len(gpus), sorted({g.name for g in gpus}))
        return True

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            self._log_once(("shutdown", str(exc)), logging.DEBUG, "NVML shutdown failed error=%s", exc)

    def _sample(self, gpu: _Gpu, families: dict[str, _Family]) -> float | None:
        """Add one GPU's samples to `families`; return its energy in joules when known."""
        nvml, labels = self._nvml, gpu.labels
        util = self._read(gpu, "utilization", nvml.nvmlDeviceGetUtilizationRates)
        if util is not None:
            families["utilization"].add_metric(labels, util.gpu / 100.0)
            families["memory_utilization"].add_metric(labels, util.memory / 100.0)
        mem = self._read(gpu, "memory", nvml.nvmlDeviceGetMemoryInfo)
        if mem is not None:
            families["memory_used"].add_metric(labels, float(mem.used))
            families["memory_total"].add_metric(labels, float(mem.total))
        energy_j: float | None = None
        for key, function, args, factor in self._scalars:
            raw = self._read(gpu, key, function, *args)
            if raw is not None:
                value = raw * factor
                families[key].add_metric(labels, value)
                if key == "energy":
                    energy_j = value
        mask = self._read(gpu, "throttle", self._throttle_fn) if self._throttle_fn else None
        if mask is not None:
            for reason, bit in THROTTLE_REASONS:
                families["throttle"].add_metric([*labels, reason], 1.0 if mask & bit else 0.0)
        return energy_j

    def _read(self, gpu: _Gpu, field: str, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(gpu.handle, *args)
        except self._nvml.NVMLError as exc:
            # NotSupported is a property of the GPU model, not a fault worth a warning.
            level = logging.DEBUG if getattr(exc, "value", None) == self._not_supported else logging.WARNING
            self._log_once(
                ("field", field, str(exc)), level, "GPU metric skipped: field=%s gpu=%d error=%s", field, gpu.index, exc
            )
            return None

    @property
    def _not_supported(self) -> int:
        return int(getattr(self._nvml, "NVML_ERROR_NOT_SUPPORTED", 3))

    def _update_efficiency(self, now: float, energy_j: dict[int, float]) -> float:
        if not energy_j:
            return self._tokens_per_joule
        try:
            tokens = float(self._output_tokens())
        except Exception as exc:
            self._log_once(
                ("output_tokens", type(exc).__name__), logging.WARNING, "output token count failed error=%r", exc
            )
            return self._tokens_per_joule
        current = _Reading(now, tokens, energy_j)
        base = self._baseline
        # A different set of GPUs reporting energy would make the sums incomparable: restart the window.
        if base is None or base.energy_j.keys() != energy_j.keys():
            self._baseline = current
            return self._tokens_per_joule
        if now - base.at < EFFICIENCY_MIN_WINDOW_S:
            return self._tokens_per_joule
        d_joules = sum(energy_j[i] - base.energy_j[i] for i in energy_j)
        d_tokens = tokens - base.tokens
        if d_joules < 0 or d_tokens < 0:  # counter reset (driver reload, engine restart)
            self._baseline = current
        elif d_joules > 0:  # NVML energy updates in steps; an unchanged counter just widens the window
            self._tokens_per_joule = d_tokens / d_joules
            self._baseline = current
        return self._tokens_per_joule

    def _log_once(self, kind: tuple[str, ...], level: int, msg: str, *args: Any) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            logger.log(level, msg, *args)


def _new_families() -> dict[str, _Family]:
    families: dict[str, _Family] = {}
    for key, (name, documentation, kind) in FAMILIES.items():
        if key in ("available", "tokens_per_joule"):
            labels: list[str] = []
        elif key == "throttle":
            labels = [*GPU_LABELS, "reason"]
        else:
            labels = list(GPU_LABELS)
        family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        families[key] = family_type(name, documentation, labels=labels)
    return families
