"""The relay-workers bench's report: per-process shares and the several/one ratio per rep pair (no engine:
the bench itself starts vLLM and two Governors, which is a benchmark, not a test)."""

from __future__ import annotations

import psutil

from governor.bench.load import LoadResult
from governor.bench.relay_cpu import Meter, Run, Side
from governor.bench.relay_workers import pair_line, side_line


def _run(events: int, shares: list[float], server_cpu: float, wakeups: int) -> Run:
    load = LoadResult(seconds=1.0, requests=1, events=events, ttfts=[0.1], gaps=[0.02])
    return Run(load, sum(shares), server_cpu, wakeups, shares)


def test_the_several_process_side_shows_each_process_share() -> None:
    several = Side([_run(1000, [0.06, 0.04], 0.1, 800), _run(1000, [0.05, 0.05], 0.1, 800)])
    line = side_line("off, 2 processes", several)
    assert "gateway 100.0 (100.0-100.0) µs/event (all its processes)" in line
    assert "ratio 1.000" in line and "woken 0.80" in line
    assert "CPU share per process (owner first): 0.55 (0.50-0.60), 0.45 (0.40-0.50)" in line
    one = side_line("off, 1 process", Side([_run(1000, [0.08], 0.1, 500)]))
    assert "share" not in one and "gateway 80.0" in one


def test_the_pair_ratio_is_per_event_several_over_one() -> None:
    one = Side([_run(1000, [0.08], 0.1, 0), _run(2000, [0.16], 0.2, 0)])
    several = Side([_run(1000, [0.05, 0.05], 0.1, 0), _run(1000, [0.045, 0.045], 0.1, 0)])
    assert pair_line(one, several).endswith(": 1.188 (1.125-1.250)")


async def test_a_meter_counts_the_relay_workers_with_the_gateway() -> None:
    me = psutil.Process()
    meter = Meter(me, me, relays=[me])  # the same process twice: its CPU counted twice, as two processes
    single = int(me.num_ctx_switches().voluntary)
    assert len(meter._gateway()) == 2 and meter._wakeups() >= 2 * single
