"""EngineScraper: a slow engine never makes /metrics slow; its last copy is served, with its age."""

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


async def test_slow_engine_gets_its_last_copy_within_the_budget_then_fresh_text() -> None:
    engine = SlowEngine("e0")
    scraper = EngineScraper(wait=0.01)
    engine.delay, engine.running = 0.2, 1
    took, first = await timed(scraper, [engine])
    assert took >= 0.2, "with no copy yet the first scrape waits for the engine"
    assert first[("vllm:num_requests_running", "e0")] == 1
    engine.delay, engine.running = 0.5, 2
    took, second = await timed(scraper, [engine])
    assert took < 0.2, took
    assert second[("vllm:num_requests_running", "e0")] == 1  # the previous copy
    assert second[("governor_engine_metrics_age_seconds", "e0")] > 0
    took, third = await timed(scraper, [engine])  # the fetch from the second scrape is still running
    assert engine.fetches == 2, "never two fetches of one engine at once"
    assert took < 0.2 and third[("vllm:num_requests_running", "e0")] == 1
    await asyncio.sleep(0.6)
    engine.delay = 0.0
    took, fourth = await timed(scraper, [engine])
    assert fourth[("vllm:num_requests_running", "e0")] == 2
    assert fourth[("governor_engine_metrics_age_seconds", "e0")] < 0.1


async def test_engine_down_drops_its_series_and_keeps_the_others() -> None:
    up, down = SlowEngine("up"), SlowEngine("down")
    scraper = EngineScraper(wait=0.01)
    _, both = await timed(scraper, [up, down])
    assert ("vllm:num_requests_running", "down") in both
    down.down = True
    _, after = await timed(scraper, [up, down])
    assert ("vllm:num_requests_running", "down") not in after
    assert ("governor_engine_metrics_age_seconds", "down") not in after
    assert ("vllm:num_requests_running", "up") in after
