"""A RemoteEngine reaching a fake engine over real HTTP, ready, for as long as a test needs it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from governor.bench.fake_engine import FakeEngine, serve
from governor.engine.process import free_port
from governor.engine.remote import RemoteEngine


@contextlib.asynccontextmanager
async def remote_to(fake: FakeEngine) -> AsyncIterator[tuple[RemoteEngine, web.AppRunner, int]]:
    """(the engine, the fake's runner, its port); a test may stop the runner and serve the fake again."""
    port = free_port()
    runner = await serve(fake, port)
    engine = RemoteEngine("fake-0", f"http://127.0.0.1:{port}")
    await engine.start()
    try:
        assert await engine.wait_ready(10)
        yield engine, runner, port
    finally:
        await engine.stop()
        await runner.cleanup()
