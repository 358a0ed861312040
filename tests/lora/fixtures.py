"""Fixtures for the adapter lifecycle tests: real PEFT adapters and a fake vLLM engine over real HTTP.
Shared by tests/lora (through its conftest) and tests/api/test_admin_routes.py (by import)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from governor.bench.fake_engine import FakeEngine, serve
from governor.engine.pool import EnginePool
from governor.engine.process import free_port
from governor.engine.remote import RemoteEngine
from governor.lora.base_model import BaseModelInfo
from governor.lora.registry import AdapterRegistry
from governor.settings import Settings
from tests.lora.factory import BASE_DIR, BASE_NAME, AdapterFactory, require_base


class CountingEngine(FakeEngine):
    """The fake engine, recording every load/unload and refusing names listed in `refuse`."""

    def __init__(self) -> None:
        super().__init__()
        self.load_calls: list[str] = []
        self.unload_calls: list[str] = []
        self.refuse: dict[str, str] = {}

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.load_calls.append(body["lora_name"])
        if body["lora_name"] in self.refuse:
            error = {"error": {"message": self.refuse[body["lora_name"]], "type": "BadRequestError", "code": 400}}
            return web.json_response(error, status=400)
        return await super().load(request)

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.unload_calls.append(body["lora_name"])
        return await super().unload(request)


@dataclass
class Engine:
    """A fake vLLM server on a real port and the RemoteEngine the gateway uses to reach it."""

    fake: CountingEngine
    remote: RemoteEngine
    runner: web.AppRunner
    port: int

    async def restart(self) -> CountingEngine:
        """Stop the fake server, wait for the gateway to see it down, start a fresh one on the same port."""
        await self.runner.cleanup()
        await wait_until(lambda: self.remote.state.value == "down", 10, "engine marked down")
        self.fake = CountingEngine()
        self.runner = await serve(self.fake, self.port)
        return self.fake


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll a condition with a deadline (no fixed sleeps)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
def factory(tmp_path_factory: pytest.TempPathFactory) -> AdapterFactory:
    require_base()
    return AdapterFactory(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="session")
def base_info() -> BaseModelInfo:
    require_base()
    return BaseModelInfo.from_dir(BASE_DIR, BASE_NAME)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "adapters"
    path.mkdir()
    return path


@pytest_asyncio.fixture(loop_scope="function")
async def engine() -> AsyncIterator[Engine]:
    async with running_engine(CountingEngine()) as handle:
        yield handle


@contextlib.asynccontextmanager
async def running_engine(fake: CountingEngine) -> AsyncIterator[Engine]:
    """`fake` on a free port, reached by a started RemoteEngine; stopped after."""
    port = free_port()
    runner = await serve(fake, port)
    remote = RemoteEngine("fake-0", f"http://127.0.0.1:{port}")
    await remote.start()
    assert await remote.wait_ready(10), "fake engine did not become ready"
    handle = Engine(fake, remote, runner, port)
    try:
        yield handle
    finally:
        await remote.stop()
        await handle.runner.cleanup()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "adapters_dir": tmp_path / "adapters", "state_dir": tmp_path / "state", "watch_adapters": False,
        "max_loras": 2, "max_cpu_loras": 2, "max_lora_rank": 16, "admin_key": "k",
    }  # fmt: skip
    values.update(overrides)
    return Settings(**values)


@pytest_asyncio.fixture(loop_scope="function")
async def make_registry(
    tmp_path: Path, engine: Engine, base_info: BaseModelInfo
) -> AsyncIterator[Callable[..., AdapterRegistry]]:
    """Build (and later stop) registries on the fake engine; keyword arguments override Settings."""
    made: list[AdapterRegistry] = []

    def build(**overrides: Any) -> AdapterRegistry:
        settings = make_settings(tmp_path, **overrides)
        registry = AdapterRegistry(settings, EnginePool([engine.remote], 100), base_info)
        made.append(registry)
        return registry

    try:
        yield build
    finally:
        for registry in made:
            await registry.stop()
