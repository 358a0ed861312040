"""EngineScraper: a slow engine never makes /metrics slow; copies are refreshed in the background while scraped."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from governor.metrics.engine import EngineScraper


class SlowEngine:
    """Stands in for an engine client: /metrics text after `delay` seconds, None when down."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.delay = 0.0
        self.running = 0.0
        self.down = False
        self.fetches = 0

    async def metrics_text(self) -> str | None:
        self.fetches += 1
        await asyncio.sleep(self.delay)
        if self.down:
            return None
        return ("# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="m"}} {self.running}\n')  # fmt: skip


def samples(text: str) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("engine", "")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


async def timed(scraper: EngineScraper, engines: list[SlowEngine]) -> tuple[float, dict[tuple[str, str], float]]:
    start = time.monotonic()
    text = await scraper.scrape(engines)  # type: ignore[arg-type]
    return time.monotonic() - start, samples(text)


async def test_scrapes_serve_the_copy_while_the_background_refresh_keeps_it_recent() -> None:
    engine = SlowEngine("e0")
    scraper = EngineScraper(refresh=0.2)
    try:
        engine.delay, engine.running = 0.3, 1
        took, first = await timed(scraper, [engine])
        assert took >= 0.3, "with no copy yet the first scrape waits for the engine"
        assert first[("vllm:num_requests_running", "e0")] == 1
        engine.running = 2  # a slow engine: every fetch takes 0.3 s
        for _ in range(5):
            took, again = await timed(scraper, [engine])
            assert took < 0.05, took
            assert again[("governor_engine_metrics_age_seconds", "e0")] < 0.2 + 0.3 + 0.1
        await asyncio.sleep(0.6)
        took, later = await timed(scraper, [engine])
        assert took < 0.05 and later[("vllm:num_requests_running", "e0")] == 2
        fetches = engine.fetches
        await asyncio.sleep(1.0)
        assert engine.fetches - fetches <= 3, "one fetch per refresh period, never overlapping"
    finally:
        await scraper.close()


async def test_refresh_stops_without_scrapes_and_restarts_fresh() -> None:
    engine = SlowEngine("e0")
    scraper = EngineScraper(refresh=0.05, idle_stop=0.2)
    try:
        await timed(scraper, [engine])
        await asyncio.sleep(0.5)
        fetches = engine.fetches
        await asyncio.sleep(0.3)
        assert engine.fetches == fetches, "nobody scrapes: the engine is left alone"
        engine.running = 5
        _, fresh = await timed(scraper, [engine])
        assert fresh[("vllm:num_requests_running", "e0")] == 5
    finally:
        await scraper.close()


async def test_engine_down_drops_its_series_and_keeps_the_others() -> None:
    up, down = SlowEngine("up"), SlowEngine("down")
    scraper = EngineScraper(refresh=0.05)
    try:
        _, both = await timed(scraper, [up, down])
        assert ("vllm:num_requests_running", "down") in both
        down.down = True
        await asyncio.sleep(0.2)
        _, after = await timed(scraper, [up, down])
        assert ("vllm:num_requests_running", "down") not in after
        assert ("governor_engine_metrics_age_seconds", "down") not in after
        assert ("vllm:num_requests_running", "up") in after
    finally:
        await scraper.close()


async def test_concurrent_first_scrapes_start_one_refresher() -> None:
    engine = SlowEngine("e0")
    engine.delay = 0.05
    scraper = EngineScraper(refresh=0.1)
    try:
        results = await asyncio.gather(*(timed(scraper, [engine]) for _ in range(5)))
        assert all(("vllm:num_requests_running", "e0") in found for _, found in results)
        await asyncio.sleep(0.55)
        assert engine.fetches <= 6, "one fetch now and one per refresh period, not one set per scrape"
    finally:
        await scraper.close()
