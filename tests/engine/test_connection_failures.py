"""One request's connection failure must not take a healthy engine out of the pool (GPU run: one
ServerDisconnectedError under ~830 clients turned every other request into a 503 until the next health
check); a truly dead engine must still be marked down within a few health intervals.

The engine is DroppingFakeEngine (a fake: real aiohttp server, /health always 200), reached over real HTTP,
as a RemoteEngine and as a supervised local process (VllmProcess)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import pytest_asyncio
from aiohttp import web

from governor.bench.fake_engine import serve
from governor.engine.base import EngineState
from governor.engine.pool import EnginePool
from governor.engine.process import VllmProcess, free_port
from governor.engine.remote import HEALTH_FAILURES_DOWN, HEALTH_INTERVAL, RemoteEngine, _Attempt, safe_to_resend
from governor.errors import EngineUnavailable
from tests.engine.dropping_engine import DROP, DroppingFakeEngine
from tests.engine.remote_fake import remote_to

ROOT = Path(__file__).resolve().parents[2]
# A dead engine is down after HEALTH_FAILURES_DOWN failed checks one interval apart; the rest is slack
# for a busy 2-core CI machine.
DOWN_WITHIN = HEALTH_INTERVAL * (HEALTH_FAILURES_DOWN + 3)

Remote = tuple[RemoteEngine, DroppingFakeEngine, web.AppRunner, int]


async def until(condition: Any, timeout: float) -> float:
    """Wait for condition() to hold; the seconds it took (fails the test past timeout)."""
    begin = time.monotonic()
    while not condition():
        assert time.monotonic() - begin < timeout, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - begin


def body(prompt: str = "hi", max_tokens: int = 4) -> dict[str, Any]:
    return {"model": "fake-model", "prompt": prompt, "max_tokens": max_tokens, "stream": True}


async def generate(engine: RemoteEngine, prompt: str = "hi") -> bytes:
    upstream = await engine.open("/v1/completions", body(prompt), {})
    try:
        assert upstream.status == 200
        return b"".join([chunk async for chunk in upstream.chunks()])
    finally:
        upstream.abort()


@pytest_asyncio.fixture(loop_scope="function")
async def remote() -> AsyncIterator[Remote]:
    fake = DroppingFakeEngine()
    async with remote_to(fake) as (engine, runner, port):
        yield engine, fake, runner, port


def test_what_is_resent() -> None:
    fresh, pooled = _Attempt(), _Attempt()
    pooled.reused = True
    refused = aiohttp.ClientConnectorError(aiohttp.client_reqrep.ConnectionKey(
        "h", 1, False, True, None, None, None, None), ConnectionRefusedError(111, "refused"))  # fmt: skip
    assert safe_to_resend(refused, fresh)  # nothing was sent
    assert safe_to_resend(aiohttp.ServerDisconnectedError(), pooled)  # the keep-alive race
    assert safe_to_resend(aiohttp.ClientOSError(104, "Connection reset by peer"), pooled)
    assert not safe_to_resend(aiohttp.ServerDisconnectedError(), fresh)  # the engine had the request
    assert not safe_to_resend(aiohttp.ClientOSError(104, "Connection reset by peer"), fresh)
    assert not safe_to_resend(aiohttp.ClientPayloadError("cut"), pooled)


async def test_an_idle_connection_closed_by_the_engine_is_resent_transparently(remote: Remote) -> None:
    engine, fake, _, _ = remote
    assert b"[DONE]" in await generate(engine)  # leaves its connection in the pool
    fake.drop_reused = 1  # the engine closes that connection as the next request arrives on it
    assert b"[DONE]" in await generate(engine)
    assert fake.dropped == ["reused"]
    assert len(fake.requests) == 2  # the dropped copy never generated; the resend did, once
    assert engine.state == EngineState.READY and engine.generation == 1


async def test_one_dropped_request_among_many_leaves_the_engine_serving(remote: Remote) -> None:
    engine, fake, _, _ = remote
    pool = EnginePool([engine], max_in_flight=1000)
    prompts = [f"p{i}" for i in range(40)]
    prompts[17] = f"please {DROP}"
    results = await asyncio.gather(*(generate(engine, p) for p in prompts), return_exceptions=True)
    # The dropped one fails cleanly (the gateway turns EngineUnavailable into a 503 envelope) ...
    failed = results.pop(17)
    assert isinstance(failed, EngineUnavailable) and failed.status == 503
    # ... and costs nothing else: every other request completed, and the pool still routes at once.
    assert all(isinstance(r, bytes) and b"[DONE]" in r for r in results), results
    assert pool.pick() is engine
    # A marked request is resent only if its first copy went out on a pooled connection (at most twice).
    assert 1 <= fake.dropped.count("marked") <= 2
    # The failure asked for a health check now; it passed, and the engine was never down (a down engine
    # bumps its generation when it comes back).
    await until(lambda: not engine._check_now.is_set(), DOWN_WITHIN)
    assert engine.state == EngineState.READY and engine.generation == 1
    assert b"[DONE]" in await generate(engine)


async def test_a_dead_engine_is_still_marked_down_promptly_and_comes_back(remote: Remote) -> None:
    engine, fake, runner, port = remote
    assert b"[DONE]" in await generate(engine)
    await runner.cleanup()  # the engine dies
    stopped = time.monotonic()
    with pytest.raises(EngineUnavailable):
        await generate(engine)  # a clean error, not a hang
    await until(lambda: engine.state == EngineState.DOWN, DOWN_WITHIN - (time.monotonic() - stopped))
    with pytest.raises(EngineUnavailable, match="No engine is ready"):
        EnginePool([engine], max_in_flight=10).pick()
    runner = await serve(fake, port)  # back on the same address
    try:
        await until(lambda: engine.state == EngineState.READY, 10)
        assert engine.generation == 2
        assert b"[DONE]" in await generate(engine)
    finally:
        await runner.cleanup()


@pytest.fixture
def local_engine(tmp_path: Path) -> VllmProcess:
    port = free_port()
    return VllmProcess(
        name="fake-local",
        command=[sys.executable, "-m", "tests.engine.dropping_engine", str(port)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        served_model="fake-model",
        log_path=tmp_path / "engine.log",
        start_timeout=60,
        backoff_max=1,
        port=port,
    )


async def test_local_engine_stays_up_on_a_dropped_request_and_goes_down_when_its_process_dies(
    local_engine: VllmProcess,
) -> None:
    engine = local_engine
    await engine.start()
    try:
        assert await engine.wait_ready(60), engine.log_path.read_text() if engine.log_path.exists() else ""
        with pytest.raises(EngineUnavailable):
            await generate(engine, DROP)
        assert b"[DONE]" in await generate(engine)
        await until(lambda: not engine._check_now.is_set(), DOWN_WITHIN)
        assert engine.state == EngineState.READY and engine.generation == 1 and engine.restarts == 0
        # The process dying is what marks a local engine down, at once, and it is restarted.
        assert engine.pid is not None
        psutil.Process(engine.pid).children()[0].kill()
        await until(lambda: engine.state != EngineState.READY, DOWN_WITHIN)
        await until(lambda: engine.state == EngineState.READY, 60)
        assert engine.generation == 2 and engine.restarts == 1
        assert b"[DONE]" in await generate(engine)
    finally:
        await engine.stop()
