"""A ready engine that is streaming is not also asked /health twice a second: its streamed bytes are the
check (the gateway and vLLM's API server each paid ~2.5 ms of CPU per probe, under load too). It is asked
again once it stops streaming, and at once when a request fails (`suspect`).

The engine is the fake (a real aiohttp server counting its /health requests), reached over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio

from governor.bench.fake_engine import FakeEngine
from governor.engine.remote import HEALTH_INTERVAL, RemoteEngine
from tests.engine.remote_fake import remote_to
from tests.engine.test_connection_failures import body, until

Served = tuple[RemoteEngine, FakeEngine]


@pytest_asyncio.fixture(loop_scope="function")
async def served() -> AsyncIterator[Served]:
    fake = FakeEngine(delay=0.01)  # a token every 10 ms: a stream that outlasts several health intervals
    async with remote_to(fake) as (engine, _, _):
        yield engine, fake


async def _stream(engine: RemoteEngine, tokens: int) -> bytes:
    upstream = await engine.open("/v1/completions", body(max_tokens=tokens), {})
    try:
        return b"".join([chunk async for chunk in upstream.chunks()])
    finally:
        upstream.abort()


async def test_a_streaming_engine_is_not_probed_and_an_idle_one_is(served: Served) -> None:
    engine, fake = served
    await asyncio.sleep(HEALTH_INTERVAL * 1.5)  # the watcher is in its rhythm
    before = fake.health_checks
    streamed = await _stream(engine, 200)  # ~2 s: four health intervals
    assert b"[DONE]" in streamed
    during = fake.health_checks - before
    assert during <= 1, f"{during} health checks while the engine streamed"  # at most one already under way
    idle_from = fake.health_checks
    await asyncio.sleep(HEALTH_INTERVAL * 4)
    assert fake.health_checks - idle_from >= 2  # quiet again: asked as before


async def test_a_suspected_failure_is_checked_even_while_streaming(served: Served) -> None:
    engine, fake = served
    stream = asyncio.ensure_future(_stream(engine, 200))
    await until(lambda: engine.heard_at > 0, 5)
    before = fake.health_checks
    engine.suspect("a test's failed request")
    await until(lambda: fake.health_checks > before, HEALTH_INTERVAL * 4)
    assert b"[DONE]" in await stream
