"""Scrape cost of Governor's GET /metrics: p50/p95/max over K scrapes, first idle, then with N streaming
requests in flight (goal: p95 < 20 ms with 8 adapters and the engine busy); and the gateway CPU each scrape
costs at an endpoint picker's rate (20 scrapes/s): windows with scrapes alternate with windows without,
under the same streams, and the CPU difference per scrape is reported per pair (median, spread).

    python loadtests/metrics_scrape.py --url http://127.0.0.1:8000 --streams 32 --scrapes 200
    python loadtests/metrics_scrape.py --fake --adapters 8 --streams 32 --scrapes 200

Against a running Governor the streams spread over every model /v1/models lists: load the adapters first
(POST /admin/adapters, or drop them in the adapters folder). With --fake the script starts a fake vLLM
(vLLM-shaped /metrics, tokens paced by --token-delay) and `governor serve` in front of it, writes and loads
--adapters adapters, and stops both at the end: it runs anywhere, without a model.

The stream driver runs in a separate process so that its event loop does not delay the scrapes. Loopback
only: a non-local --url is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

GOAL_P95_MS = 20.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPT = "Write a long, detailed travel guide to the coast, one town after another:"


# -- fake mode: a vLLM-shaped engine and a governor in front of it -------------------------------------


def serve_fake_engine(port: int, delay: float) -> None:
    """The fake engine with a /metrics as big as vLLM 0.32's (same families, buckets and `_created`)."""
    from aiohttp import web
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.gc_collector import GCCollector
    from prometheus_client.platform_collector import PlatformCollector
    from prometheus_client.process_collector import ProcessCollector

    from governor.bench.fake_engine import MODEL, FakeEngine, serve

    latency = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
    tokens = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4096)
    histograms = {
        "time_to_first_token_seconds": latency, "inter_token_latency_seconds": latency,
        "request_time_per_output_token_seconds": latency, "e2e_request_latency_seconds": latency,
        "request_queue_time_seconds": latency, "request_inference_time_seconds": latency,
        "request_prefill_time_seconds": latency, "request_decode_time_seconds": latency,
        "request_prompt_tokens": tokens, "request_generation_tokens": tokens, "iteration_tokens_total": tokens,
        "request_max_num_generation_tokens": tokens, "request_params_max_tokens": tokens,
        "request_prefill_kv_computed_tokens": tokens, "request_params_n": (1, 2, 5, 10, 20),
        "request_num_preemptions": (0, 1, 2, 5, 10),
    }  # fmt: skip
    counters = ("num_preemptions", "prompt_tokens", "prompt_tokens_cached", "generation_tokens", "prefix_cache_queries",
                "prefix_cache_hits", "external_prefix_cache_queries", "external_prefix_cache_hits",
                "mm_cache_queries", "mm_cache_hits")  # fmt: skip
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):  # vLLM has them; the gateway drops them
        collector(registry=registry)
    labels = ("model_name", "engine")
    values = (MODEL, "0")
    for name, buckets in histograms.items():
        Histogram(f"vllm:{name}", name, labels, buckets=buckets, registry=registry).labels(*values).observe(1)
    for name in counters:
        Counter(f"vllm:{name}", name, labels, registry=registry).labels(*values).inc()
    success = Counter("vllm:request_success", "finished", (*labels, "finished_reason"), registry=registry)
    for reason in ("stop", "length", "abort", "error", "repetition"):
        success.labels(*values, reason).inc()
    gauges = {name: Gauge(f"vllm:{name}", name, labels, registry=registry)
              for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")}  # fmt: skip
    waiting = Gauge("vllm:num_requests_waiting_by_reason", "waiting", (*labels, "reason"), registry=registry)
    for reason in ("capacity", "deferred"):
        waiting.labels(*values, reason).set(0)

    class VllmShapedEngine(FakeEngine):
        async def metrics(self, _: web.Request) -> web.Response:
            gauges["num_requests_running"].labels(*values).set(self.active)
            gauges["kv_cache_usage_perc"].labels(*values).set(min(1.0, self.active / 256))
            return web.Response(body=generate_latest(registry), content_type="text/plain")

    async def forever() -> None:
        await serve(VllmShapedEngine(delay=delay), port)
        while True:
            await asyncio.sleep(3600)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(forever())


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(0.25)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def fake_stack(args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    """Fake engine + governor serve on free loopback ports, `args.adapters` adapters loaded; yields the URL
    and the gateway's pid."""
    from governor.engine.process import free_port

    engine_port, gw_port = free_port(), free_port()
    admin = "bench-admin-key"
    with tempfile.TemporaryDirectory(prefix="governor-scrape-") as tmp:
        root = Path(tmp)
        from governor.bench.fake_adapter import write_adapter

        names = [f"scrape-adapter-{i}" for i in range(args.adapters)]
        for name in names:
            write_adapter(root / "adapters", name)
        env = {**os.environ, "GOVERNOR_ENGINE_URL": f"http://127.0.0.1:{engine_port}", "GOVERNOR_PORT": str(gw_port),
               "GOVERNOR_ADAPTERS_DIR": str(root / "adapters"), "GOVERNOR_STATE_DIR": str(root / "state"),
               "GOVERNOR_STAGING_DIR": str(root / "staged"),
               "GOVERNOR_WATCH_ADAPTERS": "false", "GOVERNOR_ADMIN_KEY": admin, "GOVERNOR_LOG_LEVEL": "warning",
               "GOVERNOR_MAX_LORAS": str(max(1, args.adapters)), "GOVERNOR_API_KEYS": "",
               "GOVERNOR_METRICS_AUTH": "false"}  # fmt: skip
        engine_cmd = [sys.executable, __file__, "--serve-engine", str(engine_port), "--token-delay",
                      str(args.token_delay)]  # fmt: skip
        from governor.bench.processes import spawned

        with spawned(engine_cmd) as engine, spawned([sys.executable, "-m", "governor", "serve"], env=env) as gw:
            wait_ready(f"http://127.0.0.1:{engine_port}/health", engine)
            url = f"http://127.0.0.1:{gw_port}"
            wait_ready(url + "/ready", gw)
            for name in names:
                r = httpx.post(url + "/admin/adapters", json={"name": name, "path": name},
                               headers={"Authorization": f"Bearer {admin}"}, timeout=30)  # fmt: skip
                if r.status_code != 200:
                    raise SystemExit(f"loading adapter {name} failed: {r.status_code} {r.text}")
            yield url, gw.pid


# -- the stream driver (its own process) -----------------------------------------------------------------


def drive(url: str, models: list[str], streams: int, body: dict[str, Any], headers: dict[str, str], stop: Event,
          results: Any) -> None:  # fmt: skip
    """Keep `streams` streaming completions in flight, round-robin over `models`, until `stop` is set."""
    import aiohttp

    async def run() -> tuple[int, int]:
        ok = failed = 0
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

            async def worker(index: int) -> None:
                nonlocal ok, failed
                turn = index
                while not stop.is_set():
                    payload = {**body, "model": models[turn % len(models)]}
                    turn += streams
                    try:
                        async with session.post(url + "/v1/completions", json=payload, headers=headers) as resp:
                            tail = b""
                            async for chunk in resp.content.iter_any():
                                tail = (tail + chunk)[-64:]
                            good = resp.status == 200 and tail.rstrip().endswith(b"[DONE]")
                    except (aiohttp.ClientError, TimeoutError):
                        good = False
                    ok, failed = (ok + 1, failed) if good else (ok, failed + 1)

            await asyncio.gather(*(worker(i) for i in range(streams)))
        return ok, failed

    results.put(asyncio.run(run()))


# -- scraping -----------------------------------------------------------------------------------------------


def gauge_sum(text: bytes, name: bytes) -> float:
    """Sum of the samples of one gauge family, read off the text without a full parse."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (b" ", b"{"):
            total += float(line.rsplit(b" ", 1)[1])
    return total


@contextlib.contextmanager
def driver(url: str, models: list[str], args: argparse.Namespace, headers: dict[str, str]) -> Iterator[Any]:
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True}
    ctx = multiprocessing.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=drive, args=(url, models, args.streams, body, headers, stop, results), daemon=True)
    proc.start()
    try:
        yield results
    finally:
        stop.set()
        proc.join(args.max_tokens * 2 + 60)
        if proc.is_alive():
            proc.terminate()
            proc.join(10)


def scrape(client: httpx.Client, count: int, interval: float) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"ms": [], "bytes": [], "in_flight": [], "running": []}
    for _ in range(count):
        start = time.perf_counter()
        r = client.get("/metrics")
        body = r.content
        elapsed = (time.perf_counter() - start) * 1000
        r.raise_for_status()
        out["ms"].append(elapsed)
        out["bytes"].append(len(body))
        out["in_flight"].append(gauge_sum(body, b"governor_requests_in_flight"))
        out["running"].append(gauge_sum(body, b"governor_engine_num_requests_running"))
        if interval:
            time.sleep(interval)
    return out


def cpu_pairs(client: httpx.Client, pid: int, rounds: int, window: float, interval: float) -> list[float]:
    """Gateway CPU ms per scrape: for each round, a `window` of scrapes every `interval` s and an equal window
    without, in alternating order; (CPU with - CPU without) / scrapes. The streams keep running in both."""
    out = []
    for i in range(rounds):
        spent: dict[bool, float] = {}
        scrapes = 0
        for scraping in (True, False) if i % 2 == 0 else (False, True):
            before, end = cpu_ms(pid), time.monotonic() + window
            while time.monotonic() < end:
                if scraping:
                    client.get("/metrics").raise_for_status()
                    scrapes += 1
                time.sleep(interval)
            spent[scraping] = cpu_ms(pid) - before
        out.append((spent[True] - spent[False]) / max(1, scrapes))
    return out


def render_us(adapters: int, calls: int = 2000) -> float:
    """In-process: µs to render the model-server series (the picker's families) with `adapters` adapters
    half running, half waiting, and one engine's KV-cache copy."""
    from governor.metrics.model_server import EngineCache, Flights, ModelServerSeries

    flights = Flights()
    for i in range(adapters):
        flight = flights.admit(f"adapter-{i}")
        if i % 2:
            flight.started()
    cache = EngineCache(0.3, {"block_size": "16", "num_gpu_blocks": "4096"})
    names = [(f"adapter-{i}", True, False) for i in range(adapters)]
    series = ModelServerSeries(flights, lambda: "model", adapters, lambda: names)
    start = time.perf_counter()
    for _ in range(calls):
        series.render(["engine-0"], [cache])
    return (time.perf_counter() - start) / calls * 1e6


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def summary(label: str, result: dict[str, list[float]]) -> str:
    ms = result["ms"]
    return (f"{label:<24} p50 {statistics.median(ms):6.2f} ms  p95 {p95(ms):6.2f} ms  max {max(ms):6.2f} ms  "
            f"(in flight median {statistics.median(result['in_flight']):.0f}, "
            f"engine running median {statistics.median(result['running']):.0f})")  # fmt: skip


def cpu_ms(pid: int | None) -> float:
    if pid is None:
        return 0.0
    import psutil

    times = psutil.Process(pid).cpu_times()
    return (times.user + times.system) * 1000


def run(url: str, args: argparse.Namespace, gateway_pid: int | None) -> None:
    user = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    metrics_key = args.metrics_key or args.api_key
    scrape_headers = {"Authorization": f"Bearer {metrics_key}"} if metrics_key else {}
    models = [m["id"] for m in httpx.get(url + "/v1/models", headers=user, timeout=30).json()["data"]]
    with httpx.Client(base_url=url, headers=scrape_headers, timeout=30) as client:
        scrape(client, 5, 0)  # warm: connections, first-scrape setup in the gateway
        # Loaded first, idle after: both phases then scrape the same series (every model has traffic).
        with driver(url, models, args, user) as results:
            deadline = time.monotonic() + 120
            while gauge_sum(client.get("/metrics").content, b"governor_requests_in_flight") < args.streams * 0.9:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{args.streams} streams never got in flight")
                time.sleep(0.2)
            busy = scrape(client, args.scrapes, args.interval)
            pairs = cpu_pairs(client, gateway_pid, args.rounds, args.window, 0.05) if gateway_pid else []
        ok, failed = results.get(timeout=args.max_tokens * 2 + 120)
        before = cpu_ms(gateway_pid)
        idle = scrape(client, args.scrapes, args.interval)
        per_scrape = (cpu_ms(gateway_pid) - before) / args.scrapes
    size = statistics.median(busy["bytes"]) / 1024
    print(f"GET /metrics on {url}: {args.scrapes} scrapes per phase, every {args.interval * 1000:.0f} ms; "
          f"{len(models)} models ({len(models) - 1} adapters); exposition {size:.0f} KiB")  # fmt: skip
    print(summary(f"{args.streams} streams in flight", busy))
    print(summary("idle", idle))
    if gateway_pid is not None:
        print(f"gateway CPU per idle scrape: {per_scrape:.2f} ms (independent of other load on this machine)")
    if pairs:
        print(f"gateway CPU per scrape at 20/s with {args.streams} streams: median {statistics.median(pairs):.2f} ms "
              f"(min {min(pairs):.2f}, max {max(pairs):.2f}; {len(pairs)} pairs of {args.window:g} s windows, "
              f"with/without scrapes interleaved): {statistics.median(pairs) * 20 / 10:.1f}% of a core at 20 "
              f"scrapes/s")  # fmt: skip
    print(f"model-server series render ({len(models) - 1} adapters): {render_us(max(1, len(models) - 1)):.1f} µs")
    verdict = "met" if p95(busy["ms"]) < GOAL_P95_MS else "NOT met"
    print(f"loaded/idle p95 ratio {p95(busy['ms']) / p95(idle['ms']):.2f}; goal p95 < {GOAL_P95_MS:.0f} ms "
          f"under load: {verdict}; streams finished {ok} ok, {failed} failed")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="a running Governor (loopback)")
    ap.add_argument("--fake", action="store_true", help="start a fake engine and a governor instead of --url")
    ap.add_argument("--streams", type=int, default=32, help="streaming requests kept in flight")
    ap.add_argument("--scrapes", type=int, default=200, help="scrapes per phase (idle, then loaded)")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between scrapes")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens per streamed completion")
    ap.add_argument("--adapters", type=int, default=8, help="--fake: adapters to create and load")
    ap.add_argument("--token-delay", type=float, default=0.02, help="--fake: seconds between streamed tokens")
    ap.add_argument("--api-key", default="", help="a user key for /v1 (GOVERNOR_API_KEYS)")
    ap.add_argument("--metrics-key", default="", help="key for /metrics with GOVERNOR_METRICS_AUTH (default --api-key)")
    ap.add_argument("--gateway-pid", type=int, help="pid of the governor process, to report its CPU per scrape")
    ap.add_argument("--rounds", type=int, default=10, help="with/without-scrape window pairs for the CPU figure")
    ap.add_argument("--window", type=float, default=2.0, help="seconds per window of the CPU figure")
    ap.add_argument("--serve-engine", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_engine:
        serve_fake_engine(args.serve_engine, args.token_delay)
        return
    if args.fake:
        with fake_stack(args) as (url, pid):
            run(url, args, pid)
        return
    if urlsplit(args.url).hostname not in LOOPBACK:
        raise SystemExit(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}): the driver loads it")
    run(args.url.rstrip("/"), args, args.gateway_pid)


if __name__ == "__main__":
    main()
