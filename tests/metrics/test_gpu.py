"""GpuCollector's values against a fake NVML with two GPUs, and against the real pynvml of this machine.
Faults (lost GPU, hung call, failing GPU) are in test_gpu_faults.py."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from governor.metrics.gpu import FAMILIES, THROTTLE_REASONS, GpuCollector
from tests.metrics.fake_nvml import (
    LIBRARY_NOT_FOUND,
    NO_PERMISSION,
    NOT_SUPPORTED,
    Clock,
    FakeNvml,
    Tokens,
    fresh,
    samples,
    value,
)

GPU_FAMILIES = {name for key, (name, _, _) in FAMILIES.items() if key not in ("available", "tokens_per_joule")}

Make = Callable[..., GpuCollector]


def test_exposes_every_family_per_gpu(make: Make) -> None:
    families = fresh(make())

    names = {name for name, _, _ in FAMILIES.values()}
    assert set(families) == names
    assert all(family.documentation for family in families.values())
    assert families["governor_gpu_energy_joules"].type == "counter"
    assert [s.name for s in families["governor_gpu_energy_joules"].samples] == ["governor_gpu_energy_joules_total"] * 2

    assert value(families, "governor_gpu_available") == 1
    assert samples(families, "governor_gpu_up") == {("0",): 1.0, ("1",): 1.0}
    assert samples(families, "governor_gpu_reading_age_seconds") == {("0",): 0.0, ("1",): 0.0}  # test clock
    assert families["governor_gpu_errors"].samples == []
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


def test_not_supported_skips_only_that_sample(nvml: FakeNvml, make: Make, caplog: pytest.LogCaptureFixture) -> None:
    nvml.failing[(1, "power")] = NOT_SUPPORTED
    caplog.set_level(logging.DEBUG, logger="governor.metrics.gpu")

    collector = make()
    for _ in range(3):
        families = fresh(collector)

    assert samples(families, "governor_gpu_power_watts") == {("0",): 312.5}
    assert samples(families, "governor_gpu_power_limit_watts") == {("0",): 700.0, ("1",): 72.0}
    assert value(families, "governor_gpu_temperature_celsius", "1") == 83
    # Said once (at INFO, so a serve log shows which fields this GPU model lacks), however many rounds.
    assert [r.levelno for r in caplog.records if "field=power" in r.getMessage()] == [logging.INFO]
    assert value(families, "governor_gpu_up", "1") == 1  # a property of the GPU model, not a fault
    assert families["governor_gpu_errors"].samples == []


def test_field_error_skips_that_field_counts_it_and_keeps_the_gpu_up(nvml: FakeNvml, make: Make) -> None:
    nvml.failing[(0, "temperature")] = NO_PERMISSION

    families = fresh(make())

    assert samples(families, "governor_gpu_temperature_celsius") == {("1",): 83}
    assert value(families, "governor_gpu_power_watts", "0") == 312.5
    assert samples(families, "governor_gpu_up") == {("0",): 1.0, ("1",): 1.0}
    assert set(samples(families, "governor_gpu_errors")) == {("no_permission", "0")}
    assert samples(families, "governor_gpu_errors")[("no_permission", "0")] >= 1


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(TypeError("argument 2: <class 'TypeError'>: wrong type"), id="call-raises-non-nvml"),
        pytest.param(SimpleNamespace(version=0x02000028, free=1), id="struct-of-another-version"),
    ],
)
def test_non_nvml_failure_in_one_field_skips_only_that_field(
    nvml: FakeNvml, make: Make, caplog: pytest.LogCaptureFixture, fault: object
) -> None:
    """A binding that does not match the driver for one call (a ctypes TypeError, a v2 struct without
    `used`) is that field's problem: before, the first discarded the GPU's whole reading every round and
    the second killed the reader thread."""
    if isinstance(fault, Exception):
        nvml.raising[(0, "memory")] = fault
    else:
        nvml.structs[(0, "memory")] = fault
    caplog.set_level(logging.DEBUG, logger="governor.metrics.gpu")
    collector = make()
    for _ in range(3):
        families = fresh(collector)

    assert samples(families, "governor_gpu_memory_used_bytes") == {("1",): 20 * 2**30}
    assert samples(families, "governor_gpu_memory_total_bytes") == {("1",): 24 * 2**30}
    assert value(families, "governor_gpu_power_watts", "0") == 312.5
    assert value(families, "governor_gpu_utilization_ratio", "0") == 0.5
    assert samples(families, "governor_gpu_up") == {("0",): 1.0, ("1",): 1.0}
    assert value(families, "governor_gpu_available") == 1
    assert set(samples(families, "governor_gpu_errors")) == {("other", "0")}  # counted, every round
    assert samples(families, "governor_gpu_errors")[("other", "0")] >= 3
    assert [r.levelno for r in caplog.records if "field=memory" in r.getMessage()] == [logging.WARNING]


def test_gpu_whose_every_field_fails_is_down(nvml: FakeNvml, make: Make) -> None:
    for call in ("utilization", "memory", "temperature", "power", "power_limit", "energy", "clock", "throttle"):
        nvml.raising[(1, call)] = RuntimeError("binding broken")

    families = fresh(make())

    assert samples(families, "governor_gpu_up") == {("0",): 1.0, ("1",): 0.0}  # not "up" with nothing to show
    assert samples(families, "governor_gpu_errors")[("other", "1")] >= 8


def test_init_failure_reports_unavailable_and_declares_families(nvml: FakeNvml, make: Make) -> None:
    nvml.init_error = LIBRARY_NOT_FOUND

    families = fresh(make())

    assert value(families, "governor_gpu_available") == 0
    assert set(families) == {name for name, _, _ in FAMILIES.values()}
    for name, family in families.items():
        assert family.documentation
        if name != "governor_gpu_available":
            assert family.samples == [], name


def test_init_retried_at_most_every_60s(nvml: FakeNvml, make: Make) -> None:
    nvml.init_error = LIBRARY_NOT_FOUND
    clock = Clock()
    collector = make(clock=clock)

    for _ in range(10):
        fresh(collector)
        clock.now += 5.0
    assert nvml.init_calls == 1

    nvml.init_error = None
    clock.now += 20.0  # 70 s after the first attempt
    assert value(fresh(collector), "governor_gpu_available") == 1
    fresh(collector)
    assert nvml.init_calls == 2


def test_failures_logged_once(nvml: FakeNvml, make: Make, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="governor.metrics.gpu")
    nvml.init_error = LIBRARY_NOT_FOUND
    clock = Clock()
    collector = make(clock=clock)
    for _ in range(20):
        fresh(collector)
        clock.now += 61.0  # every scrape retries init
    assert nvml.init_calls == 20
    assert len([r for r in caplog.records if "init failed" in r.getMessage()]) == 1

    caplog.clear()
    nvml.init_error = None
    nvml.failing[(0, "temperature")] = NO_PERMISSION
    nvml.failing[(1, "temperature")] = NO_PERMISSION
    for _ in range(20):
        fresh(collector)
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert [(r.levelno, "field=temperature" in r.getMessage()) for r in skipped] == [(logging.WARNING, True)]

    # A lost GPU: one warning when it goes, one line when it is back, however many rounds in between.
    caplog.clear()
    nvml.lost.add(1)
    for _ in range(5):
        fresh(collector)
        clock.now += 1.0  # lets the re-inits run
    nvml.lost.clear()
    clock.now += 60.0
    fresh(collector)
    fresh(collector)
    transitions = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("GPU down", "GPU up"))]
    assert transitions == ["GPU down gpu=1 error=gpu_is_lost", "GPU up again gpu=1"]


def test_tokens_per_joule_across_scrapes(nvml: FakeNvml, make: Make) -> None:
    clock, tokens = Clock(), Tokens()
    collector = make(tokens, clock=clock)
    rate = "governor_gpu_output_tokens_per_joule"

    assert value(fresh(collector), rate) == 0  # first reading is only a baseline

    clock.now += 0.5
    tokens.total += 100
    nvml.energy_mj = [1_010_000, 2_010_000]
    assert value(fresh(collector), rate) == 0  # under 1 s apart: not known yet

    clock.now += 1.5
    tokens.total += 500  # 600 tokens over (60 + 140) J since the baseline
    nvml.energy_mj = [1_060_000, 2_140_000]
    assert value(fresh(collector), rate) == pytest.approx(3.0)

    clock.now += 0.2
    tokens.total += 1000
    nvml.energy_mj = [1_061_000, 2_141_000]
    assert value(fresh(collector), rate) == pytest.approx(3.0)  # kept: window too short

    clock.now += 2.0
    nvml.energy_mj = [1_110_000, 2_190_000]  # 1000 tokens over 100 J since the last computed window
    assert value(fresh(collector), rate) == pytest.approx(10.0)


def test_tokens_per_joule_kept_when_energy_unreadable(nvml: FakeNvml, make: Make) -> None:
    clock, tokens = Clock(), Tokens()
    collector = make(tokens, clock=clock)
    fresh(collector)
    clock.now += 2.0
    tokens.total = 200
    nvml.energy_mj = [1_050_000, 2_050_000]
    assert value(fresh(collector), "governor_gpu_output_tokens_per_joule") == pytest.approx(2.0)

    nvml.failing[(1, "energy")] = NOT_SUPPORTED
    clock.now += 2.0
    tokens.total = 10_000
    families = fresh(collector)
    assert value(families, "governor_gpu_output_tokens_per_joule") == pytest.approx(2.0)
    assert samples(families, "governor_gpu_energy_joules") == {("0",): pytest.approx(1050.0)}


def test_pynvml_import_failure(monkeypatch: pytest.MonkeyPatch, make: Make) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError

    families = fresh(make(nvml=None))

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
    collector = GpuCollector(Tokens(), interval=0.01)

    families = fresh(collector)
    collector.close()

    assert value(families, "governor_gpu_available") == 0
    assert all(families[name].samples == [] for name in GPU_FAMILIES)


def test_real_gpu_if_present() -> None:
    if not real_nvml_works():
        pytest.skip("no NVIDIA GPU/driver on this machine (NVML does not initialise)")
    collector = GpuCollector(Tokens(), interval=0.01)

    families = fresh(collector)
    collector.close()

    assert value(families, "governor_gpu_available") == 1
    assert all(v == 1 for v in samples(families, "governor_gpu_up").values())
    assert samples(families, "governor_gpu_memory_total_bytes")
    assert all(v > 0 for v in samples(families, "governor_gpu_memory_total_bytes").values())
    assert all(0 <= v <= 1 for v in samples(families, "governor_gpu_utilization_ratio").values())
    assert all(v > 0 for v in samples(families, "governor_gpu_clock_sm_hertz").values())
    assert all(v in (0, 1) for v in samples(families, "governor_gpu_throttle_reasons").values())
