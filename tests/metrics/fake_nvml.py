"""A fake NVML (the subset of pynvml GpuCollector calls) with two GPUs, faults and hangs on demand,
and helpers that scrape a GpuCollector once its background reader has seen the fake's current state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from governor.metrics.gpu import GpuCollector

UNINITIALIZED = 1
NOT_SUPPORTED = 3
NO_PERMISSION = 4
DRIVER_NOT_LOADED = 9
LIBRARY_NOT_FOUND = 12
GPU_IS_LOST = 15
UNKNOWN = 999
MESSAGES = {
    UNINITIALIZED: "Uninitialized",
    NOT_SUPPORTED: "Not Supported",
    NO_PERMISSION: "Insufficient Permissions",
    DRIVER_NOT_LOADED: "Driver Not Loaded",
    LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    GPU_IS_LOST: "GPU is lost",
    UNKNOWN: "Unknown Error",
}


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return MESSAGES[self.value]


@dataclass
class FakeGpu:
    name: str
    uuid: str
    util: tuple[int, int]  # percent: gpu, memory
    mem: tuple[int, int]  # bytes: used, total
    temp: int
    power_mw: int
    limit_mw: int
    sm_mhz: int
    mem_mhz: int
    reasons: int


class FakeNvml:
    """Handles are GPU indices. Faults: `failing[(gpu, call)] = code` fails one call, `lost` GPUs fail every
    call (listing included), `driver_loaded = False` fails init (driver not loaded) and every device call
    (uninitialized); `hang[(gpu or None, call)] = event` blocks that call until the event is set;
    `raising[(gpu, call)] = exc` raises any exception (not only NVML's), `slow[(gpu, call)] = s` delays
    that call by s seconds, `structs[(gpu, call)] = obj` makes the utilization or memory call return obj
    (a struct of another binding version)."""

    NVMLError = FakeNVMLError
    NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2

    def __init__(self) -> None:
        self.init_error: int | None = None
        self.init_calls = 0
        self.shutdown_calls = 0
        self.driver_loaded = True
        self.lost: set[int] = set()
        self.failing: dict[tuple[int, str], int] = {}  # (gpu, call) -> NVML error code
        self.hang: dict[tuple[int | None, str], threading.Event] = {}
        self.raising: dict[tuple[int, str], BaseException] = {}
        self.slow: dict[tuple[int, str], float] = {}
        self.structs: dict[tuple[int, str], Any] = {}
        self.hung_calls = 0  # calls that entered a hang
        self.entered = threading.Event()  # set when a call starts hanging
        self.energy_mj = [1_000_000, 2_000_000]
        self.gpus = [
            FakeGpu("NVIDIA H100 80GB HBM3", "GPU-aaaa", util=(50, 25), mem=(10 * 2**30, 80 * 2**30), temp=61,
                    power_mw=312_500, limit_mw=700_000, sm_mhz=1980, mem_mhz=2619, reasons=0x0),
            # sw_power_cap and sw_thermal, plus a bit outside the exported label set
            FakeGpu("NVIDIA L4", "GPU-bbbb", util=(100, 80), mem=(20 * 2**30, 24 * 2**30), temp=83,
                    power_mw=72_000, limit_mw=72_000, sm_mhz=1500, mem_mhz=6251, reasons=0x4 | 0x20 | 0x400),
        ]  # fmt: skip

    def _enter(self, gpu: int | None, call: str) -> None:
        event = self.hang.get((gpu, call))
        if event is not None:
            self.hung_calls += 1
            self.entered.set()
            event.wait()

    def _gpu(self, handle: int, call: str) -> FakeGpu:
        self._enter(handle, call)
        if (handle, call) in self.slow:
            time.sleep(self.slow[(handle, call)])
        if (handle, call) in self.raising:
            raise self.raising[(handle, call)]
        if not self.driver_loaded:
            raise FakeNVMLError(UNINITIALIZED)
        if handle in self.lost:
            raise FakeNVMLError(GPU_IS_LOST)
        if (handle, call) in self.failing:
            raise FakeNVMLError(self.failing[(handle, call)])
        return self.gpus[handle]

    def nvmlInit(self) -> None:
        self.init_calls += 1
        self._enter(None, "init")
        if not self.driver_loaded:
            raise FakeNVMLError(DRIVER_NOT_LOADED)
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._gpu(index, "handle")
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._gpu(handle, "name").name

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self._gpu(handle, "uuid").uuid.encode()  # old pynvml returns bytes

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        gpu, memory = self._gpu(handle, "utilization").util
        return self.structs.get((handle, "utilization"), SimpleNamespace(gpu=gpu, memory=memory))

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        used, total = self._gpu(handle, "memory").mem
        return self.structs.get((handle, "memory"), SimpleNamespace(used=used, total=total, free=total - used))

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._gpu(handle, "temperature").temp

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._gpu(handle, "power").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return self._gpu(handle, "power_limit").limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        self._gpu(handle, "energy")
        return self.energy_mj[handle]

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        gpu = self._gpu(handle, "clock")
        return {self.NVML_CLOCK_SM: gpu.sm_mhz, self.NVML_CLOCK_MEM: gpu.mem_mhz}[clock]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return self._gpu(handle, "throttle").reasons


class Clock:
    """A test clock for reading times and ages; the reader's pacing and idling stay on real time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tokens:
    def __init__(self) -> None:
        self.total = 0.0

    def __call__(self) -> float:
        return self.total


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def scrape(collector: GpuCollector) -> dict[str, Any]:
    """Families by name, parsed back from the exposition text a Prometheus server would read."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def fresh(collector: GpuCollector) -> dict[str, Any]:
    """Scrape once the reader has completed a round that began after this call, so the state set before
    it is what the scrape shows (the reader runs on its own; this waits for it, not for a time)."""
    target = collector.rounds + 2  # the round in progress now may predate the caller's changes

    def read() -> bool:
        collector.start()  # as a scrape does: starts the reader if none runs (or it died)
        return collector.rounds >= target

    wait_until(read)
    return scrape(collector)


def samples(families: dict[str, Any], family: str) -> dict[tuple[str, ...], float]:
    """Sample values keyed by (error?, gpu, reason?) label values."""
    return {
        tuple(v for k, v in sorted(s.labels.items()) if k in ("error", "gpu", "reason")): s.value
        for s in families[family].samples
    }


def value(families: dict[str, Any], family: str, gpu: str | None = None) -> float | None:
    return samples(families, family).get((gpu,) if gpu is not None else ())


def labels(families: dict[str, Any], family: str) -> list[dict[str, str]]:
    return [dict(s.labels) for s in families[family].samples]


def up(families: dict[str, Any]) -> dict[tuple[str, ...], float]:
    return samples(families, "governor_gpu_up")


def errors(families: dict[str, Any]) -> dict[tuple[str, ...], float]:
    return samples(families, "governor_gpu_errors")


def readers(collector: Any) -> int:
    """This collector's reader threads alive (a stuck one included)."""
    return sum(1 for thread in threading.enumerate() if thread.name == collector.thread_name)
