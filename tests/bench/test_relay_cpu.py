"""The relay CPU bench's arithmetic, its wake-up floor and its profile buckets (no engine: the bench
itself starts vLLM, which is a benchmark, not a test)."""

from __future__ import annotations

import time

import psutil
import pytest

from governor.bench.load import LoadResult
from governor.bench.relay_cpu import Meter, Run, Side, report
from governor.bench.relay_profile import LOOP, bucket, buckets
from governor.bench.wakeup import on_cpu_seconds, wakeup_cost

SERVER = "run (governor/runtime/server.py:77);Server.run (uvicorn/server.py:86);Runner.run (asyncio/runners.py:118)"


def test_on_cpu_seconds_agrees_with_the_process_clock_and_ignores_sleep() -> None:
    start, clock = on_cpu_seconds(), time.process_time()
    deadline = time.perf_counter() + 10
    while time.process_time() - clock < 0.2:  # busy: CPU time, however the machine shares its cores
        assert time.perf_counter() < deadline
    busy, busy_clock = on_cpu_seconds() - start, time.process_time() - clock
    start = on_cpu_seconds()
    time.sleep(0.2)
    idle = on_cpu_seconds() - start
    assert busy == pytest.approx(busy_clock, rel=0.2)
    assert idle < 0.05


def test_a_bare_wakeup_costs_something_and_not_a_millisecond() -> None:
    cost = wakeup_cost(0.001, wakeups=100)
    assert 0 < cost < 1000


def _run(events: int, seconds: float, gateway_cpu: float, server_cpu: float, wakeups: int) -> Run:
    load = LoadResult(seconds=seconds, requests=1, events=events, ttfts=[0.1], gaps=[0.02])
    return Run(load, gateway_cpu, server_cpu, wakeups)


def test_per_event_subtracts_each_process_idle_background() -> None:
    me = psutil.Process()
    meter = Meter(me, me, gateway_idle=0.01, server_idle=0.002)
    # 10 s, 10,000 events: idle is 0.1 s (gateway) and 0.02 s (server) of the CPU counted
    gateway, server, idle = meter.per_event(_run(10_000, 10.0, 0.6, 1.02, 5_000))
    assert gateway == pytest.approx(50.0)
    assert server == pytest.approx(100.0)
    assert idle == pytest.approx(10.0)
    assert meter.gross(_run(10_000, 10.0, 0.6, 1.02, 5_000)) == pytest.approx((60.0, 102.0))


def test_report_gives_the_ratio_the_idle_and_the_latency_deltas() -> None:
    me = psutil.Process()
    meter = Meter(me, me, gateway_idle=0.0, server_idle=0.0)
    direct, gateway = Side([_run(1000, 1.0, 0.0, 0.1, 0)]), Side([_run(1000, 1.0, 0.03, 0.1, 500)])
    line = report(meter, "off", direct, gateway)
    assert "gateway 30.0 (30.0-30.0) µs/event" in line
    assert "API server 100.0" in line
    assert "ratio median 0.300" in line
    assert "woken 0.50" in line
    assert "gross (nothing subtracted): gateway 30.0 (30.0-30.0), API server 100.0 (100.0-100.0)" in line
    assert "inter-token p50 gateway 20.00 ms (direct 20.00, +0.00)" in line


def test_local_mode_reports_the_gateway_latency_without_a_direct_side() -> None:
    me = psutil.Process()
    line = report(Meter(me, me), "off", Side(), Side([_run(1000, 1.0, 0.03, 0.1, 500)]))
    assert "TTFT p50 gateway 100.0 ms; inter-token p50 gateway 20.00 ms (no direct side: local mode)" in line


@pytest.mark.parametrize(
    ("leaf", "expected"),
    [
        ("Relay._stream_checked (governor/stream/relay.py:292);"
         "LoopDetector.feed (governor/stream/loop_detector.py:137)", "loop detector"),
        ("Relay._blocks (governor/stream/relay.py:144);EventSplitter.feed_block (governor/stream/sse.py:39)",
         "parse (relay, SSE)"),
        ("HttpUpstream.chunks (governor/engine/remote.py:75);StreamReader._wait (aiohttp/streams.py:365);"
         "Future.result (asyncio/futures.py:10)", "read (aiohttp)"),
        ("SSEResponse._pump (governor/api/sse_response.py:51);RequestResponseCycle.send "
         "(uvicorn/protocols/http/httptools_impl.py:542)", "write (uvicorn, ASGI)"),
        ("", LOOP),  # only the server's own frames: the event loop's native code
    ],
)  # fmt: skip
def test_a_sample_goes_to_its_innermost_named_part(leaf: str, expected: str) -> None:
    assert bucket(f"{SERVER};{leaf}" if leaf else SERVER) == expected


def test_buckets_sum_the_folded_counts() -> None:
    folded = f"{SERVER} 7\n{SERVER};Relay._blocks (governor/stream/relay.py:1) 3\nnot a line\n"
    assert buckets(folded) == {LOOP: 7, "parse (relay, SSE)": 3}
