"""The whole gateway (create_app) in front of the fake engine, over real HTTP to the engine and ASGI
to the app: routes, auth, limits and policy are tested without vLLM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio
from aiohttp import web
from fastapi import FastAPI

from governor.bench.fake_engine import FakeEngine, serve
from governor.engine.pool import EnginePool
from governor.engine.process import free_port
from governor.engine.remote import RemoteEngine
from governor.lora.base_model import BaseModelInfo
from governor.lora.registry import AdapterRegistry
from governor.runtime.app import create_app
from governor.runtime.bootstrap import build_policy
from governor.settings import Settings
from tests.lora.factory import BASE_DIR

USER, ADMIN = "user-key", "admin-key"


class Gateway:
    def __init__(self, client: httpx.AsyncClient, fake: FakeEngine, pool: EnginePool, settings: Settings,
                 runner: web.AppRunner, app: FastAPI) -> None:  # fmt: skip
        self.client, self.fake, self.pool, self.settings = client, fake, pool, settings
        self.runner, self.app = runner, app

    async def stop_engine(self) -> None:
        """Stop the fake engine's listener (the engine dies; the gateway keeps running)."""
        await self.runner.cleanup()


GatewayFactory = Callable[..., Any]


@pytest_asyncio.fixture(loop_scope="function")
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """gateway(script=None, delay=0, fake=None, **settings) → a started Gateway; everything is torn down after.

    `fake` replaces the default FakeEngine(script, delay), e.g. with a subclass serving other /metrics.
    """
    cleanups: list[Any] = []

    async def build(
        script: list[str] | None = None, delay: float = 0.0, fake: FakeEngine | None = None, **overrides: Any
    ) -> Gateway:
        fake = fake or FakeEngine(script=script, delay=delay)
        port = free_port()
        runner = await serve(fake, port)
        cleanups.append(runner.cleanup)
        values: dict[str, Any] = {"adapters_dir": tmp_path / "adapters", "state_dir": tmp_path / "state",
                                  "watch_adapters": False, "engine_url": [f"http://127.0.0.1:{port}"],
                                  "staging_dir": tmp_path / "staged"}  # the remote (fake) engine shares it  # fmt: skip
        values.update(overrides)
        settings = Settings(**values)
        settings.adapters_dir.mkdir(exist_ok=True)
        pool = EnginePool(
            [RemoteEngine("fake-0", f"http://127.0.0.1:{port}")], settings.max_running + settings.max_queued
        )
        model_dir = BASE_DIR if (BASE_DIR / "tokenizer.json").exists() else None
        policy = build_policy(settings, model_dir)
        registry = AdapterRegistry(
            settings, pool, BaseModelInfo.unknown("fake-model"), compile_profile=policy.compile_profile
        )
        app = create_app(settings, pool, policy, registry)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        cleanups.append(lambda: lifespan.__aexit__(None, None, None))
        assert await pool.engines[0].wait_ready(10)  # type: ignore[attr-defined]
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30)
        cleanups.append(client.aclose)
        return Gateway(client, fake, pool, settings, runner, app)

    try:
        yield build
    finally:
        for cleanup in reversed(cleanups):
            await cleanup()


async def chunked(body: bytes, size: int = 1024) -> AsyncIterator[bytes]:
    """`body` as a stream of `size`-byte chunks: httpx sends it without Content-Length (chunked), so only the
    server's count of the bytes as they arrive can bound it."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
