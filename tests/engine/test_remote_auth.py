"""RemoteEngine over a Unix socket with a key: every call Governor makes to an engine carries it.

The engine is the fake vLLM server (named as a fake) behind a middleware that refuses calls without
the key, as vLLM's --api-key does for /v1 (and stricter: here every path, so a forgotten header fails)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest_asyncio
from aiohttp import web

from governor.bench.fake_engine import FakeEngine
from governor.engine.base import EngineState
from governor.engine.remote import RemoteEngine

KEY = "k" * 43
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest_asyncio.fixture(loop_scope="function")
async def keyed_socket(tmp_path: Path) -> AsyncIterator[tuple[Path, list[str]]]:
    refused: list[str] = []

    @web.middleware
    async def require_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            refused.append(request.path)
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    fake = FakeEngine()
    fake.app.middlewares.append(require_key)
    runner = web.AppRunner(fake.app)
    await runner.setup()
    sock = tmp_path / "engine.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        yield sock, refused
    finally:
        await runner.cleanup()


async def test_every_call_sends_the_key_over_the_socket(keyed_socket: tuple[Path, list[str]]) -> None:
    sock, refused = keyed_socket
    engine = RemoteEngine("e", "http://engine", api_key=KEY, socket_path=sock)
    await engine.start()
    try:
        assert await engine.wait_ready(10) and engine.state == EngineState.READY
        assert engine.served_model  # discovered through /v1/models
        assert await engine.probe()
        status, _ = await engine.request_json("POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"})
        assert status == 200
        assert (await engine.metrics_text()) is not None
        upstream = await engine.open("/v1/completions", {"model": engine.served_model, "prompt": "x",
                                     "max_tokens": 3, "stream": True}, {"X-Request-Id": "r1"})  # fmt: skip
        assert upstream.status == 200 and b"[DONE]" in b"".join([c async for c in upstream.chunks()])
        assert refused == []
    finally:
        await engine.stop()


async def test_without_the_key_the_engine_refuses(keyed_socket: tuple[Path, list[str]]) -> None:
    sock, refused = keyed_socket
    engine = RemoteEngine("e", "http://engine", socket_path=sock)
    try:
        assert not await engine.health()
        status, _ = await engine.request_json("GET", "/v1/models")
        assert status == 401 and refused
    finally:
        await engine.stop()
