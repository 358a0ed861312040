"""EngineScraper: a slow engine never makes /metrics slow; copies are refreshed in the background while scraped.
The engine here answers only when its gate opens, so "the scrape did not wait for it" is shown by a scrape
that returns while the engine is still held, not by a wall-clock bound."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from governor.metrics.engine import EngineScraper
from tests.lora.fixtures import wait_until

PATIENCE = 10.0  # seconds: generous deadlines for what should take milliseconds


class GatedEngine:
    """Stands in for an engine client: /metrics text once `gate` is open (always, unless closed), None when down."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.gate = asyncio.Event()
        self.gate.set()
        self.running = 0.0
        self.down = False
        self.fetches = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def metrics_text(self) -> str | None:
        self.fetches += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        if self.down:
            return None
        return ("# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="m"}} {self.running}\n')  # fmt: skip


def samples(text: str) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("engine", "")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


async def scrape(scraper: EngineScraper, engines: list[GatedEngine]) -> dict[tuple[str, str], float]:
    text = await asyncio.wait_for(scraper.scrape(engines), PATIENCE)  # type: ignore[arg-type]
    return samples(text)


async def test_scrapes_serve_the_copy_while_the_background_refresh_keeps_it_recent() -> None:
    engine = GatedEngine("e0")
    scraper = EngineScraper(refresh=0.05)
    try:
        engine.gate.clear()
        engine.running = 1
        first = asyncio.ensure_future(scrape(scraper, [engine]))
        await wait_until(lambda: engine.in_flight == 1, PATIENCE, "the first fetch")
        assert not first.done(), "with no copy yet the first scrape waits for the engine"
        engine.gate.set()
        assert (await first)[("vllm:num_requests_running", "e0")] == 1

        engine.gate.clear()  # the engine stops answering: the next background fetch hangs
        engine.running = 2
        await wait_until(lambda: engine.in_flight == 1, PATIENCE, "a background fetch held by the engine")
        for _ in range(5):  # served from the copy while the engine is held
            held = await scrape(scraper, [engine])
            assert held[("vllm:num_requests_running", "e0")] == 1 and engine.in_flight == 1
        assert engine.most_in_flight == 1, "a held fetch is never overlapped by another"

        engine.gate.set()
        fetches, started = engine.fetches, time.monotonic()
        while (await scrape(scraper, [engine]))[("vllm:num_requests_running", "e0")] != 2:
            assert time.monotonic() - started < PATIENCE, "the copy was not refreshed"
            await asyncio.sleep(0.01)
        later = await scrape(scraper, [engine])
        assert later[("governor_engine_metrics_age_seconds", "e0")] < PATIENCE
        await asyncio.sleep(0.5)  # a window to count fetches in: one per refresh period at most
        await scrape(scraper, [engine])
        assert engine.fetches - fetches <= 2 + (time.monotonic() - started) / scraper.refresh
    finally:
        await scraper.close()


async def test_refresh_stops_without_scrapes_and_restarts_fresh() -> None:
    engine = GatedEngine("e0")
    scraper = EngineScraper(refresh=0.05, idle_stop=0.2)
    try:
        await scrape(scraper, [engine])
        fetches = engine.fetches
        await wait_until(lambda: scraper._task is None, PATIENCE, "the refresher to stop with nobody scraping")
        assert engine.fetches > fetches, "it refreshed while the last scrape was recent"
        fetches = engine.fetches
        await asyncio.sleep(0.3)  # a few refresh periods: nobody scrapes, so the engine is left alone
        assert engine.fetches == fetches
        engine.running = 5
        assert (await scrape(scraper, [engine]))[("vllm:num_requests_running", "e0")] == 5
    finally:
        await scraper.close()


async def test_engine_down_drops_its_series_and_keeps_the_others() -> None:
    up, down = GatedEngine("up"), GatedEngine("down")
    scraper = EngineScraper(refresh=0.05)
    try:
        both = await scrape(scraper, [up, down])
        assert ("vllm:num_requests_running", "down") in both
        down.down = True
        started = time.monotonic()
        while ("vllm:num_requests_running", "down") in (after := await scrape(scraper, [up, down])):
            assert time.monotonic() - started < PATIENCE, "the down engine's series stayed"
            await asyncio.sleep(0.01)
        assert ("governor_engine_metrics_age_seconds", "down") not in after
        assert ("vllm:num_requests_running", "up") in after
    finally:
        await scraper.close()


async def test_concurrent_first_scrapes_start_one_refresher() -> None:
    engine = GatedEngine("e0")
    engine.gate.clear()
    scraper = EngineScraper(refresh=0.1)
    try:
        scrapes = [asyncio.ensure_future(scrape(scraper, [engine])) for _ in range(5)]
        await wait_until(lambda: engine.fetches >= 1, PATIENCE, "the first fetch")
        await asyncio.sleep(0.05)  # the later scrapes start meanwhile; the held fetch serves them all
        assert engine.fetches == 1 and not any(s.done() for s in scrapes)
        engine.gate.set()
        started = time.monotonic()
        results = await asyncio.gather(*scrapes)
        assert all(("vllm:num_requests_running", "e0") in found for found in results)
        await asyncio.sleep(0.5)  # a window to count fetches in
        assert engine.most_in_flight == 1
        assert engine.fetches <= 2 + (time.monotonic() - started) / scraper.refresh, (
            "one set per period, not per scrape"
        )
    finally:
        await scraper.close()
