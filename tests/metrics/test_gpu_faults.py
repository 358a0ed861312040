"""GpuCollector under NVML faults, against the fake NVML: a lost GPU, the driver going away, a call that
hangs for good, one of two GPUs failing at listing and at reading; close. The reader's life (no stop between
scrapes, rounds that raise, a killed thread, a busy event loop) is in test_gpu_reader.py."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml
import yaml

from governor.metrics.gpu import GpuCollector
from governor.metrics.nvml_reader import ERROR_NAMES, NvmlReader
from tests.metrics.fake_nvml import (
    UNKNOWN,
    Clock,
    FakeNvml,
    errors,
    fresh,
    labels,
    readers,
    samples,
    scrape,
    up,
    value,
    wait_until,
)

Make = Callable[..., GpuCollector]
ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_DEADLINE_S = 10.0  # behavioural and generous: a scrape that waited on the hung call would take forever


def timed_scrape(collector: GpuCollector) -> dict[str, Any]:
    started = time.monotonic()
    families = scrape(collector)
    assert time.monotonic() - started < SCRAPE_DEADLINE_S
    return families


def test_lost_gpu_goes_down_is_counted_and_is_back_after_reinit(nvml: FakeNvml, make: Make) -> None:
    clock = Clock()
    collector = make(clock=clock)
    assert up(fresh(collector)) == {("0",): 1.0, ("1",): 1.0}

    nvml.lost.add(0)
    families = fresh(collector)
    assert up(families) == {("0",): 0.0, ("1",): 1.0}
    assert value(families, "governor_gpu_available") == 1  # GPU 1 still serves
    assert errors(families)[("gpu_is_lost", "0")] >= 1
    assert set(errors(families)) == {("gpu_is_lost", "0")}
    assert samples(families, "governor_gpu_power_watts") == {("1",): 72.0}  # only the GPU that is up
    assert {"gpu": "0", "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa"} in labels(families, "governor_gpu_up")
    assert nvml.init_calls == 1  # re-init waits for its backoff (1 s, test clock)

    clock.now += 1.0
    families = fresh(collector)
    assert (nvml.shutdown_calls, nvml.init_calls) == (1, 2)  # re-initialised
    assert up(families) == {("0",): 0.0, ("1",): 1.0}  # GPU 1 read throughout, GPU 0 still lost
    clock.now += 1.0
    fresh(collector)
    assert nvml.init_calls == 2  # the next attempt waits 2 s
    clock.now += 1.0
    fresh(collector)
    assert nvml.init_calls == 3

    nvml.lost.clear()  # the GPU was reset
    clock.now += 4.0
    families = fresh(collector)
    assert nvml.init_calls == 4
    assert up(families) == {("0",): 1.0, ("1",): 1.0}
    assert samples(families, "governor_gpu_power_watts") == {("0",): 312.5, ("1",): 72.0}
    clock.now += 100.0
    fresh(collector)
    assert nvml.init_calls == 4  # healthy again: no more re-inits


def test_driver_gone_marks_every_gpu_down_and_reinitialises_with_backoff(nvml: FakeNvml, make: Make) -> None:
    clock = Clock()
    collector = make(clock=clock)
    fresh(collector)

    nvml.driver_loaded = False
    families = fresh(collector)
    assert up(families) == {("0",): 0.0, ("1",): 0.0}
    assert value(families, "governor_gpu_available") == 0
    assert set(errors(families)) == {("uninitialized", "0"), ("uninitialized", "1")}
    assert families["governor_gpu_power_watts"].samples == []

    attempts = []
    for _ in range(8):  # 8 s of test time: re-inits after 1, then 2, then 4 s
        clock.now += 1.0
        families = fresh(collector)
        attempts.append(nvml.init_calls - 1)
        assert up(families) == {("0",): 0.0, ("1",): 0.0}  # series stay while NVML is down
    assert attempts == [1, 1, 2, 2, 2, 2, 3, 3]

    nvml.driver_loaded = True
    clock.now += 8.0
    families = fresh(collector)
    assert up(families) == {("0",): 1.0, ("1",): 1.0}
    assert value(families, "governor_gpu_available") == 1


def test_one_gpu_failing_at_listing_leaves_the_other(nvml: FakeNvml, make: Make) -> None:
    nvml.failing[(0, "handle")] = UNKNOWN
    collector = make()

    families = fresh(collector)

    assert up(families) == {("0",): 0.0, ("1",): 1.0}
    assert {"gpu": "0", "name": "", "uuid": ""} in labels(families, "governor_gpu_up")  # never named yet
    assert value(families, "governor_gpu_temperature_celsius", "1") == 83
    assert set(samples(families, "governor_gpu_temperature_celsius")) == {("1",)}
    assert set(errors(families)) == {("unknown", "0")}
    assert value(families, "governor_gpu_available") == 1
    assert nvml.shutdown_calls == 0  # not a fault re-init fixes: listing is simply retried

    del nvml.failing[(0, "handle")]
    families = fresh(collector)
    assert up(families) == {("0",): 1.0, ("1",): 1.0}
    assert {"gpu": "0", "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa"} in labels(families, "governor_gpu_up")


def test_one_gpu_failing_at_reading_leaves_the_other(nvml: FakeNvml, make: Make) -> None:
    nvml.failing[(1, "memory")] = UNKNOWN
    collector = make()

    families = fresh(collector)

    assert up(families) == {("0",): 1.0, ("1",): 0.0}
    assert set(samples(families, "governor_gpu_memory_used_bytes")) == {("0",)}
    assert set(samples(families, "governor_gpu_power_watts")) == {("0",)}  # a failing GPU shows no values
    assert set(errors(families)) == {("unknown", "1")}

    del nvml.failing[(1, "memory")]
    families = fresh(collector)
    assert up(families) == {("0",): 1.0, ("1",): 1.0}
    assert value(families, "governor_gpu_memory_used_bytes", "1") == 20 * 2**30
    assert nvml.shutdown_calls == 0


def test_hung_call_never_blocks_a_scrape_and_marks_the_gpus_down(nvml: FakeNvml, make: Make) -> None:
    collector = make(clock=time.monotonic, stale_after=0.3)
    assert up(fresh(collector)) == {("0",): 1.0, ("1",): 1.0}

    release = nvml.hang[(0, "memory")] = threading.Event()
    assert nvml.entered.wait(5.0)
    timed_scrape(collector)
    families: dict[str, Any] = {}

    def down() -> bool:
        nonlocal families
        families = timed_scrape(collector)
        return up(families) == {("0",): 0.0, ("1",): 0.0} and bool(errors(families))

    wait_until(down)  # every GPU: the one stuck and the one the stuck thread cannot reach
    assert value(families, "governor_gpu_available") == 0
    assert all(age > 0.3 for age in samples(families, "governor_gpu_reading_age_seconds").values())
    assert errors(families) == {("hung", "0"): 1.0}
    assert families["governor_gpu_power_watts"].samples == []  # no stale values served as current

    for _ in range(20):
        families = timed_scrape(collector)
    assert errors(families) == {("hung", "0"): 1.0}  # counted once per stuck call
    assert (readers(collector), nvml.hung_calls) == (1, 1)  # no second reader piled up behind the stuck one

    release.set()
    assert up(fresh(collector)) == {("0",): 1.0, ("1",): 1.0}
    assert value(fresh(collector), "governor_gpu_available") == 1


def test_hung_init_never_blocks_a_scrape(nvml: FakeNvml, make: Make) -> None:
    release = nvml.hang[(None, "init")] = threading.Event()
    collector = make(clock=time.monotonic, stale_after=0.3)

    families = timed_scrape(collector)
    assert nvml.entered.wait(5.0)
    assert value(timed_scrape(collector), "governor_gpu_available") == 0
    assert families["governor_gpu_up"].samples == []
    wait_until(lambda: errors(timed_scrape(collector)) == {("hung", ""): 1.0})  # said, not silently empty
    assert errors(timed_scrape(collector)) == {("hung", ""): 1.0}  # once per stuck call

    release.set()
    assert value(fresh(collector), "governor_gpu_available") == 1


def test_close_releases_nvml_and_returns_despite_a_hung_call(nvml: FakeNvml, make: Make) -> None:
    collector = make()
    fresh(collector)
    collector.close()
    assert readers(collector) == 0 and nvml.shutdown_calls == 1

    release = nvml.hang[(1, "power")] = threading.Event()
    collector.start()
    assert nvml.entered.wait(5.0)
    started = time.monotonic()
    collector.close(timeout=0.1)
    assert time.monotonic() - started < SCRAPE_DEADLINE_S
    assert readers(collector) == 1  # left behind, still stuck in the driver

    release.set()
    wait_until(lambda: readers(collector) == 0)  # it finishes its call, sees close and releases NVML
    assert nvml.shutdown_calls == 2


def test_error_names_are_the_snake_case_of_pynvml_errors() -> None:
    """The table the `error` label comes from matches this pynvml's own error codes and classes."""
    constants = {getattr(pynvml, n): n for n in dir(pynvml) if n.startswith("NVML_ERROR_")}
    for code, constant in constants.items():
        assert ERROR_NAMES.get(code) == constant.removeprefix("NVML_ERROR_").lower(), constant
    reader = NvmlReader(pynvml, time.monotonic, lambda gpu, done: None)
    assert reader.error_name(pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)) == "gpu_is_lost"
    assert type(pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)).__name__ == "NVMLError_GpuIsLost"
    assert reader.error_name(pynvml.NVMLError(12345)) == "other"
    assert reader.error_name(RuntimeError("not NVML")) == "other"


def test_gpu_down_alert_selects_exactly_the_lost_gpu(nvml: FakeNvml, make: Make) -> None:
    """deploy/prometheus/alerts.yml's GovernorGpuDown, evaluated on real scrapes (its expr is `<series> == 0`)."""
    (rule,) = [
        r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if r["alert"] == "GovernorGpuDown"
    ]
    match = re.fullmatch(r"(\w+) == 0", rule["expr"].strip())
    assert match, "the check below evaluates only `<series> == 0`; update it with the rule"
    series = match.group(1)

    def firing(families: dict[str, Any]) -> list[str]:
        return [s.labels["gpu"] for s in families[series].samples if s.value == 0]

    collector = make()
    assert firing(fresh(collector)) == []
    nvml.lost.add(1)
    assert firing(fresh(collector)) == ["1"]
