"""An adapter whose target_modules regex would backtrack for minutes on Python's `re` (the gateway's own
process) is dropped into the watched folder of a running gateway: it is refused within seconds, and /health,
served by the same event loop over real HTTP, answers within seconds (not minutes) while it is handled.
Fake engine, real gateway."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import uvicorn

from governor.bench.fake_engine import serve
from governor.engine.pool import EnginePool
from governor.engine.process import free_port
from governor.engine.remote import RemoteEngine
from governor.lora.base_model import BaseModelInfo
from governor.lora.registry import AdapterRegistry
from governor.runtime.app import create_app
from governor.runtime.bootstrap import build_policy
from tests.lora.factory import BASE_DIR, AdapterFactory, edit_config
from tests.lora.fixtures import CountingEngine, make_settings, wait_until

# ~0.1 s at 20 characters on Python's re, 2^len(module name) steps for the first: minutes per module.
PATTERNS = ["(.|.)*Z", "(.|.)*(.|.)*(x|x)*(.|.)*(.|.)*(.|.)*(.|.)*Z"]


async def test_catastrophic_regex_dropped_in_watched_folder(
    tmp_path: Path, factory: AdapterFactory, base_info: BaseModelInfo
) -> None:
    fake = CountingEngine()
    engine_port = free_port()
    engine_runner = await serve(fake, engine_port)
    settings = make_settings(tmp_path, watch_adapters=True)
    settings.adapters_dir.mkdir()
    pool = EnginePool([RemoteEngine("fake-0", f"http://127.0.0.1:{engine_port}")], 100)
    policy = build_policy(settings, BASE_DIR)
    registry = AdapterRegistry(settings, pool, base_info, compile_profile=policy.compile_profile)
    handled: dict[str, float] = {}  # name → when the watcher handed the folder to the registry
    real_folder_changed = registry.folder_changed

    async def folder_changed(name: str) -> None:
        handled.setdefault(name, time.monotonic())
        await real_folder_changed(name)

    registry.folder_changed = folder_changed  # type: ignore[method-assign]
    app = create_app(settings, pool, policy, registry)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started, 30, "the gateway to listen")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            await wait_until(lambda: pool.any_ready(), 10, "the fake engine to be ready")
            for i, pattern in enumerate(PATTERNS):
                edit_config(factory.copy("good", tmp_path / f"evil-{i}"), target_modules=pattern)
            dropped = time.monotonic()
            for i in range(len(PATTERNS)):  # whole folders appear at once, as a `mv` into the root does
                os.rename(tmp_path / f"evil-{i}", settings.adapters_dir / f"evil-{i}")
            latencies: list[float] = []
            failed: dict[str, float] = {}
            # probed until both are refused, and at least 20 times (the refusals may come at once)
            while (len(failed) < len(PATTERNS) or len(latencies) < 20) and time.monotonic() - dropped < 60:
                started = time.perf_counter()
                r = await client.get("/health")
                latencies.append(time.perf_counter() - started)
                assert r.status_code == 200
                for a in registry.list():
                    if a["state"] == "failed":
                        failed.setdefault(a["name"], time.monotonic())
                        assert "backtrack" in a["reason"]
                await asyncio.sleep(0.005)
    finally:
        server.should_exit = True
        await serving
        await engine_runner.cleanup()

    assert sorted(failed) == ["evil-0", "evil-1"], registry.list()
    # Generous bounds: Python's re would take minutes on these patterns, and block the event loop meanwhile.
    for name, at in failed.items():
        assert at - handled[name] < 10, f"{name}: {at - handled[name]:.2f} s from hand-over to refusal"
        assert at - dropped < 30  # the watcher waits for a folder to settle (0.4 s) before handing it over
    worst = max(latencies)
    assert len(latencies) >= 20 and worst < 10, f"/health took up to {worst:.2f} s over {len(latencies)} probes"
    assert fake.load_calls == []
