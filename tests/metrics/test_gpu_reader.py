"""The GPU reader's life against the fake NVML: it reads from start() to close() whether or not anyone
scrapes, a round that raises is published as a counted failure, a killed thread is replaced and counted,
and neither a slow NVML call nor a busy event loop stops readings."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from governor.metrics.gpu import GpuCollector
from tests.metrics.fake_nvml import FakeNvml, errors, fresh, readers, samples, scrape, up, value, wait_until

Make = Callable[..., GpuCollector]


def test_a_lone_scrape_after_a_quiet_spell_finds_a_fresh_reading(make: Make) -> None:
    """The H200 run: a scrape at startup, none for ~6 minutes, then one. The reader used to stop 300 s after
    the last scrape, so that scrape rendered a ~50 s old reading: GPU down, no values, no error counted."""
    collector = make(clock=time.monotonic, stale_after=1.0)
    scrape(collector)  # starts the reader, as the smoke check's scrape did
    quiet_from = collector.rounds
    # >= 2 s of 10 ms rounds (twice stale_after), no scrape meanwhile
    wait_until(lambda: collector.rounds >= quiet_from + 200, timeout=30)

    families = scrape(collector)  # one scrape, no waiting for the reader

    assert up(families) == {("0",): 1.0, ("1",): 1.0}
    assert value(families, "governor_gpu_available") == 1
    assert all(age < 1.0 for age in samples(families, "governor_gpu_reading_age_seconds").values())
    assert samples(families, "governor_gpu_power_watts") == {("0",): 312.5, ("1",): 72.0}
    assert errors(families) == {}


def test_started_reader_has_a_reading_for_the_first_scrape(make: Make) -> None:
    """The app starts the reader at startup, so its first scrape is not an empty `available 0`."""
    collector = make()
    collector.start()
    wait_until(lambda: collector.rounds >= 1)

    families = scrape(collector)

    assert value(families, "governor_gpu_available") == 1
    assert up(families) == {("0",): 1.0, ("1",): 1.0}


class FakeNvmlBrokenRound(FakeNvml):
    """A binding that breaks outside any one NVML call (looking up its utilization function raises while
    `broken`), so a whole reading round raises."""

    broken = True

    @property
    def nvmlDeviceGetUtilizationRates(self) -> Any:  # type: ignore[override]
        if self.broken:
            raise AttributeError("nvmlDeviceGetUtilizationRates")
        return FakeNvml.nvmlDeviceGetUtilizationRates.__get__(self)


def test_round_that_raises_is_counted_and_reading_resumes(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="governor.metrics.gpu")
    nvml = FakeNvmlBrokenRound()
    collector = make(nvml=nvml)

    for _ in range(3):  # rounds keep coming: the thread did not die (before, it did, and rounds stopped)
        families = fresh(collector)
    assert value(families, "governor_gpu_available") == 0
    assert up(families) == {("0",): 0.0}  # identified before the raise; GPU 1 never was
    assert set(errors(families)) == {("reader_failed", "0")}
    assert errors(families)[("reader_failed", "0")] >= 3
    failed = [r for r in caplog.records if "GPU reading failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR and failed[0].exc_info

    nvml.broken = False
    families = fresh(collector)
    assert up(families) == {("0",): 1.0, ("1",): 1.0}
    assert value(families, "governor_gpu_available") == 1
    assert readers(collector) == 1


class FakeThreadKill(BaseException):
    """Not an Exception: ends the reader thread the way nothing in the reader can catch."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_killed_reader_is_counted_and_the_next_scrape_replaces_it(nvml: FakeNvml, make: Make) -> None:
    nvml.raising[(0, "power")] = FakeThreadKill()
    collector = make()
    collector.start()
    wait_until(lambda: readers(collector) == 0)

    del nvml.raising[(0, "power")]
    families = scrape(collector)  # sees the death and starts a new reader
    assert errors(families) == {("reader_failed", ""): 1.0}
    assert value(families, "governor_gpu_available") == 0

    families = fresh(collector)
    assert up(families) == {("0",): 1.0, ("1",): 1.0}
    assert readers(collector) == 1


def test_slow_call_delays_only_the_reading(nvml: FakeNvml, make: Make) -> None:
    nvml.slow[(0, "power")] = 0.05  # slow, not hung: well inside the staleness bound
    collector = make(clock=time.monotonic, stale_after=2.0)

    for _ in range(3):
        families = fresh(collector)

    assert up(families) == {("0",): 1.0, ("1",): 1.0}
    assert value(families, "governor_gpu_power_watts", "0") == 312.5
    assert errors(families) == {}  # no `hung`


def test_readings_continue_while_the_event_loop_is_busy(make: Make) -> None:
    """The reader is a thread, not a task: an event loop that never idles (the H200 run relayed ~800
    streams) still gets readings, since the reader only needs the GIL between NVML calls. Here the loop
    never yields at all, so a reader that were a task would get no round; a few rounds, not a rate, are
    asked for, since a loaded 2-core CI can leave the thread unscheduled for a second at a time."""
    collector = make(clock=time.monotonic, stale_after=5.0)
    collector.start()
    wait_until(lambda: collector.rounds >= 1)
    start = collector.rounds
    deadline = time.monotonic() + 30.0

    async def blocked_loop() -> None:  # CPU work and never an await: the loop is busy the whole time
        while collector.rounds < start + 5 and time.monotonic() < deadline:
            sum(range(2000))

    asyncio.run(blocked_loop())

    assert collector.rounds >= start + 5  # reached while the loop was busy, not after
    families = scrape(collector)
    assert value(families, "governor_gpu_available") == 1
    assert all(age < 5.0 for age in samples(families, "governor_gpu_reading_age_seconds").values())
