"""Counters, gauges and histograms that render straight to the Prometheus text format.

The per-request metrics use these instead of prometheus_client's: its exposition spends ~11 µs a
line on validation, escaping and sample tuples, and with 8 adapters x 2 endpoints the gateway's
histograms made each scrape cost ~9 ms of event-loop time. Here each child keeps its label text
ready and a scrape is plain string formatting (~1 µs a line). Updated and rendered on the event
loop only, so there are no locks.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.utils import floatToGoString


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True))


class Value:
    """One counter or gauge series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class Buckets:
    """One histogram series: per-bucket counts (made cumulative when rendered) and the sum."""

    __slots__ = ("bounds", "counts", "le", "sum")

    def __init__(self, bounds: tuple[float, ...], le: tuple[str, ...]) -> None:
        self.bounds, self.le = bounds, le  # shared by the family's children
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


S = TypeVar("S", Value, Buckets)


class Family(Generic[S]):
    """A metric family with fixed label names; a child is created on first use of a label set."""

    def __init__(self, kind: str, name: str, documentation: str, labelnames: Sequence[str],
                 make: Callable[[], S]) -> None:  # fmt: skip
        self.kind = kind
        self.name = name
        self.labelnames = tuple(labelnames)
        self._make: Callable[[], S] = make
        self._head = f"# HELP {name} {documentation}\n# TYPE {name} {kind}\n"
        self._children: dict[tuple[str, ...], tuple[str, S]] = {}

    def labels(self, *values: str) -> S:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = (_label_text(self.labelnames, values), self._make())
        return child[1]

    def remove(self, *values: str) -> None:
        self._children.pop(values, None)

    def series(self) -> Iterator[tuple[tuple[str, ...], S]]:
        for values, (_, series) in self._children.items():
            yield values, series

    def render(self, out: list[str]) -> None:
        out.append(self._head)
        name = self.name
        for labels, series in self._children.values():
            braces = "{" + labels + "}" if labels else ""
            if isinstance(series, Value):
                out.append(f"{name}{braces} {series.value!r}\n")
                continue
            sep = labels + "," if labels else ""
            total = 0
            for le, count in zip(series.le, series.counts, strict=True):
                total += count
                out.append(f"{name}_bucket{{{sep}{le}}} {total}\n")
            out.append(f"{name}_count{braces} {total}\n{name}_sum{braces} {series.sum!r}\n")


class Families:
    """The gateway's own families, rendered together."""

    def __init__(self) -> None:
        self._families: list[Family[Value] | Family[Buckets]] = []

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Family[Value]:
        """Exposed as ``name_total``, as prometheus_client names counters."""
        family = Family("counter", name + "_total", documentation, labelnames, Value)
        self._families.append(family)
        return family

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Family[Value]:
        family = Family("gauge", name, documentation, labelnames, Value)
        self._families.append(family)
        return family

    def histogram(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
                  ) -> Family[Buckets]:  # fmt: skip
        bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        le = tuple([f'le="{floatToGoString(b)}"' for b in bounds] + ['le="+Inf"'])
        family = Family("histogram", name, documentation, labelnames, lambda: Buckets(bounds, le))
        self._families.append(family)
        return family

    def render(self) -> bytes:
        out: list[str] = []
        for family in self._families:
            family.render(out)
        return "".join(out).encode()
