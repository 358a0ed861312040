"""GpuCollector against a fake NVML with two GPUs, and against the real pynvml of this machine."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from governor.metrics.gpu import FAMILIES, THROTTLE_REASONS, GpuCollector

NOT_SUPPORTED = 3
LIBRARY_NOT_FOUND = 12
GPU_IS_LOST = 15
MESSAGES = {
    NOT_SUPPORTED: "Not Supported",
    LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    GPU_IS_LOST: "GPU is lost",
}

GPU_FAMILIES = {name for key, (name, _, _) in FAMILIES.items() if key not in ("available", "tokens_per_joule")}


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
    """The subset of pynvml GpuCollector calls; handles are GPU indices."""

    NVMLError = FakeNVMLError
    NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2

    def __init__(self) -> None:
        self.init_error: int | None = None
        self.init_calls = 0
        self.failing: dict[tuple[int, str], int] = {}  # (gpu, function) -> NVML error code
        self.energy_mj = [1_000_000, 2_000_000]
        self.gpus = [
            FakeGpu("NVIDIA H100 80GB HBM3", "GPU-aaaa", util=(50, 25), mem=(10 * 2**30, 80 * 2**30), temp=61,
                    power_mw=312_500, limit_mw=700_000, sm_mhz=1980, mem_mhz=2619, reasons=0x0),
            # sw_power_cap and sw_thermal, plus a bit outside the exported label set
            FakeGpu("NVIDIA L4", "GPU-bbbb", util=(100, 80), mem=(20 * 2**30, 24 * 2**30), temp=83,
                    power_mw=72_000, limit_mw=72_000, sm_mhz=1500, mem_mhz=6251, reasons=0x4 | 0x20 | 0x400),
        ]  # fmt: skip

    def _gpu(self, handle: int, function: str) -> FakeGpu:
        if (handle, function) in self.failing:
            raise FakeNVMLError(self.failing[(handle, function)])
        return self.gpus[handle]

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.gpus[handle].name

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self.gpus[handle].uuid.encode()  # old pynvml returns bytes

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        gpu, memory = self._gpu(handle, "utilization").util
        return SimpleNamespace(gpu=gpu, memory=memory)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        used, total = self._gpu(handle, "memory").mem
        return SimpleNamespace(used=used, total=total, free=total - used)

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
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tokens:
    def __init__(self) -> None:
        self.total = 0.0

    def __call__(self) -> float:
        return self.total


def scrape(collector: GpuCollector) -> dict[str, Any]:
    """Families by name, parsed back from the exposition text a Prometheus server would read."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(families: dict[str, Any], family: str) -> dict[tuple[str, ...], float]:
    """Sample values keyed by (gpu, reason?) label values."""
    return {
        tuple(v for k, v in sorted(s.labels.items()) if k in ("gpu", "reason")): s.value
        for s in families[family].samples
    }


def value(families: dict[str, Any], family: str, gpu: str | None = None) -> float | None:
    return samples(families, family).get((gpu,) if gpu is not None else ())


@pytest.fixture
def nvml() -> FakeNvml:
    return FakeNvml()


def test_exposes_every_family_per_gpu(nvml: FakeNvml) -> None:
    families = scrape(GpuCollector(Tokens(), nvml=nvml, clock=Clock()))

    names = {name for name, _, _ in FAMILIES.values()}
    assert set(families) == names
    assert all(family.documentation for family in families.values())
    assert families["governor_gpu_energy_joules"].type == "counter"
    assert [s.name for s in families["governor_gpu_energy_joules"].samples] == ["governor_gpu_energy_joules_total"] * 2

    assert value(families, "governor_gpu_available") == 1
    power = families["governor_gpu_power_watts"].samples
    assert {frozenset(s.labels.items()) for s in power} == {
        frozenset({"gpu": "0", "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa"}.items()),
        frozenset({"gpu": "1", "name": "NVIDIA L4", "uuid": "GPU-bbbb"}.items()),
    }
    expected = {
        "governor_gpu_utilization_ratio": (0.5, 1.0),
        "governor_gpu_memory_utilization_ratio": (0.25, 0.8),
        "governor_gpu_memory_used_bytes": (10 * 2**30, 20 * 2**30),
        "governor_gpu_memory_total_bytes": (80 * 2**30, 24 * 2**30),
        "governor_gpu_temperature_celsius": (61, 83),
        "governor_gpu_power_watts": (312.5, 72.0),
        "governor_gpu_power_limit_watts": (700.0, 72.0),
        "governor_gpu_energy_joules": (1000.0, 2000.0),
        "governor_gpu_clock_sm_hertz": (1980e6, 1500e6),
        "governor_gpu_clock_memory_hertz": (2619e6, 6251e6),
    }
    for family, (gpu0, gpu1) in expected.items():
        assert samples(families, family) == {("0",): pytest.approx(gpu0), ("1",): pytest.approx(gpu1)}, family

    throttle = samples(families, "governor_gpu_throttle_reasons")
    reasons = [reason for reason, _ in THROTTLE_REASONS]
    assert throttle == {
        **{("0", r): 0.0 for r in reasons},
        **{("1", r): 1.0 if r in ("sw_power_cap", "sw_thermal") else 0.0 for r in reasons},
    }
    assert value(families, "governor_gpu_output_tokens_per_joule") == 0


def test_not_supported_skips_only_that_sample(nvml: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    nvml.failing[(1, "power")] = NOT_SUPPORTED
    caplog.set_level(logging.DEBUG, logger="governor.metrics.gpu")

    families = scrape(GpuCollector(Tokens(), nvml=nvml, clock=Clock()))

    assert samples(families, "governor_gpu_power_watts") == {("0",): 312.5}
    assert samples(families, "governor_gpu_power_limit_watts") == {("0",): 700.0, ("1",): 72.0}
    assert value(families, "governor_gpu_temperature_celsius", "1") == 83
    assert [r.levelno for r in caplog.records if "field=power" in r.getMessage()] == [logging.DEBUG]


def test_init_failure_reports_unavailable_and_declares_families(nvml: FakeNvml) -> None:
    nvml.init_error = LIBRARY_NOT_FOUND

    families = scrape(GpuCollector(Tokens(), nvml=nvml, clock=Clock()))

    assert value(families, "governor_gpu_available") == 0
    assert set(families) == {name for name, _, _ in FAMILIES.values()}
    for name, family in families.items():
        assert family.documentation
        if name != "governor_gpu_available":
            assert family.samples == [], name


def test_init_retried_at_most_every_60s(nvml: FakeNvml) -> None:
    nvml.init_error = LIBRARY_NOT_FOUND
    clock = Clock()
    collector = GpuCollector(Tokens(), nvml=nvml, clock=clock)

    for _ in range(10):
        scrape(collector)
        clock.now += 5.0
    assert nvml.init_calls == 1

    nvml.init_error = None
    clock.now += 20.0  # 70 s after the first attempt
    assert value(scrape(collector), "governor_gpu_available") == 1
    scrape(collector)
    assert nvml.init_calls == 2


def test_failures_logged_once(nvml: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="governor.metrics.gpu")
    nvml.init_error = LIBRARY_NOT_FOUND
    clock = Clock()
    collector = GpuCollector(Tokens(), nvml=nvml, clock=clock)
    for _ in range(20):
        scrape(collector)
        clock.now += 61.0  # every scrape retries init
    assert nvml.init_calls == 20
    assert len([r for r in caplog.records if "init failed" in r.getMessage()]) == 1

    caplog.clear()
    nvml.init_error = None
    nvml.failing[(0, "temperature")] = GPU_IS_LOST
    nvml.failing[(1, "temperature")] = GPU_IS_LOST
    for _ in range(20):
        scrape(collector)
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert [(r.levelno, "field=temperature" in r.getMessage()) for r in skipped] == [(logging.WARNING, True)]


def test_tokens_per_joule_across_scrapes(nvml: FakeNvml) -> None:
    clock, tokens = Clock(), Tokens()
    collector = GpuCollector(tokens, nvml=nvml, clock=clock)
    rate = "governor_gpu_output_tokens_per_joule"

    assert value(scrape(collector), rate) == 0  # first reading is only a baseline

    clock.now += 0.5
    tokens.total += 100
    nvml.energy_mj = [1_010_000, 2_010_000]
    assert value(scrape(collector), rate) == 0  # under 1 s apart: not known yet

    clock.now += 1.5
    tokens.total += 500  # 600 tokens over (60 + 140) J since the baseline
    nvml.energy_mj = [1_060_000, 2_140_000]
    assert value(scrape(collector), rate) == pytest.approx(3.0)

    clock.now += 0.2
    tokens.total += 1000
    nvml.energy_mj = [1_061_000, 2_141_000]
    assert value(scrape(collector), rate) == pytest.approx(3.0)  # kept: window too short

    clock.now += 2.0
    nvml.energy_mj = [1_110_000, 2_190_000]  # 1000 tokens over 100 J since the last computed window
    assert value(scrape(collector), rate) == pytest.approx(10.0)


def test_tokens_per_joule_kept_when_energy_unreadable(nvml: FakeNvml) -> None:
    clock, tokens = Clock(), Tokens()
    collector = GpuCollector(tokens, nvml=nvml, clock=clock)
    scrape(collector)
    clock.now += 2.0
    tokens.total = 200
    nvml.energy_mj = [1_050_000, 2_050_000]
    assert value(scrape(collector), "governor_gpu_output_tokens_per_joule") == pytest.approx(2.0)

    nvml.failing[(1, "energy")] = NOT_SUPPORTED
    clock.now += 2.0
    tokens.total = 10_000
    families = scrape(collector)
    assert value(families, "governor_gpu_output_tokens_per_joule") == pytest.approx(2.0)
    assert samples(families, "governor_gpu_energy_joules") == {("0",): pytest.approx(1050.0)}


def test_pynvml_import_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError

    families = scrape(GpuCollector(Tokens()))

    assert value(families, "governor_gpu_available") == 0
    assert set(families) >= GPU_FAMILIES


def real_nvml_works() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    finally:
        pynvml.nvmlShutdown()


def test_real_pynvml_without_gpu() -> None:
    if real_nvml_works():
        pytest.skip("NVML found a GPU here; test_real_gpu_if_present covers this machine")
    collector = GpuCollector(Tokens())

    families = scrape(collector)
    collector.close()

    assert value(families, "governor_gpu_available") == 0
    assert all(families[name].samples == [] for name in GPU_FAMILIES)


def test_real_gpu_if_present() -> None:
    if not real_nvml_works():
        pytest.skip("no NVIDIA GPU/driver on this machine (NVML does not initialise)")
    collector = GpuCollector(Tokens())

    families = scrape(collector)
    collector.close()

    assert value(families, "governor_gpu_available") == 1
    assert samples(families, "governor_gpu_memory_total_bytes")
    assert all(v > 0 for v in samples(families, "governor_gpu_memory_total_bytes").values())
    assert all(0 <= v <= 1 for v in samples(families, "governor_gpu_utilization_ratio").values())
    assert all(v > 0 for v in samples(families, "governor_gpu_clock_sm_hertz").values())
    assert all(v in (0, 1) for v in samples(families, "governor_gpu_throttle_reasons").values())
