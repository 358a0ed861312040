"""Fixtures shared by the GPU collector tests (test_gpu.py, test_gpu_faults.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from governor.metrics.gpu import GpuCollector
from tests.metrics.fake_nvml import Clock, FakeNvml, Tokens

Make = Callable[..., GpuCollector]


@pytest.fixture
def nvml() -> FakeNvml:
    return FakeNvml()


@pytest.fixture
def make(nvml: FakeNvml) -> Iterator[Make]:
    """GpuCollectors on the fake NVML and a test clock, reading every 10 ms; closed after the test."""
    made: list[GpuCollector] = []

    def factory(tokens: Any = None, **kwargs: Any) -> GpuCollector:
        kwargs.setdefault("nvml", nvml)
        kwargs.setdefault("clock", Clock())
        kwargs.setdefault("interval", 0.01)
        made.append(GpuCollector(tokens or Tokens(), **kwargs))
        return made[-1]

    yield factory
    for event in nvml.hang.values():  # never leave a reader thread blocked behind a failed test
        event.set()
    for collector in made:
        collector.close()
