"""A remote engine gets the same policy as a local one when the model's files are here.

The engine is the fake vLLM server over real HTTP (named as a fake); bootstrap, policy and gateway
are the real ones. Upstream bodies are compared with the ones the local-engine path builds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from governor.bench.fake_engine import FakeEngine, serve
from governor.engine.process import free_port
from governor.policy.tokenizer_info import TokenizerInfo
from governor.processors import extra_args as xa
from governor.runtime.app import create_app
from governor.runtime.bootstrap import build_policy, build_pool, build_registry, resolve_model
from governor.settings import Settings
from tests.lora.factory import BASE_DIR, require_base
from tests.model.test_files import use_hub_cache

COMPARED = ("stop", "stop_token_ids", "vllm_xargs")
CHAT = {"messages": [{"role": "user", "content": "Write a poem."}], "max_tokens": 4}
COMPLETION = {"prompt": "Once upon a time", "max_tokens": 4}


class RootReportingFake(FakeEngine):
    """A fake engine whose /v1/models names `root`, as vLLM names the path it loaded."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "served", "object": "model", "root": self.root}]})


@pytest_asyncio.fixture(loop_scope="function")
async def fake_url() -> AsyncIterator[tuple[FakeEngine, str]]:
    fake = RootReportingFake(str(BASE_DIR))
    port = free_port()
    runner = await serve(fake, port)
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _upstream_bodies(settings: Settings, fake: FakeEngine) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send one chat and one completions request through a gateway bootstrapped from `settings`."""
    # build_pool asks the engine synchronously (it runs before the event loop in `governor serve`).
    pool, model_dir = await asyncio.to_thread(build_pool, settings)
    policy = build_policy(settings, model_dir)
    app = create_app(settings, pool, policy, build_registry(settings, pool, model_dir, policy))
    async with app.router.lifespan_context(app):
        assert await pool.engines[0].wait_ready(10)  # type: ignore[attr-defined]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as client:
            model = pool.served_model
            for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
                reply = await client.post(path, json={"model": model, **body})
                assert reply.status_code == 200, reply.text
            sent = fake.requests[-2:]
            ready = await client.get("/ready")
            # The readiness probe is a completions request under the default preset.
            assert fake.requests[-1]["vllm_xargs"] == sent[1]["vllm_xargs"]
    return sent, ready.json()


def _local_bodies(tmp_path: Path) -> list[dict[str, Any]]:
    """What a local engine on the same model would be sent."""
    settings = Settings(model=str(BASE_DIR), state_dir=tmp_path / "local-state")
    _, _, model_dir = resolve_model(settings)
    policy = build_policy(settings, model_dir)
    return [
        policy.build({"model": "m", **CHAT}, kind="chat").body,
        policy.build({"model": "m", **COMPLETION}, kind="completions").body,
    ]


def _settings(tmp_path: Path, url: str, **values: Any) -> Settings:
    return Settings(
        engine_url=[url], adapters_dir=tmp_path, state_dir=tmp_path / "state", watch_adapters=False, **values
    )


@pytest.mark.parametrize("source", ["GOVERNOR_MODEL", "engine root"])
async def test_remote_engine_gets_the_local_policy(
    tmp_path: Path, fake_url: tuple[FakeEngine, str], source: str
) -> None:
    require_base()
    fake, url = fake_url
    settings = _settings(tmp_path, url, model=str(BASE_DIR) if source == "GOVERNOR_MODEL" else "")
    sent, ready = await _upstream_bodies(settings, fake)
    expected = _local_bodies(tmp_path)
    for got, want in zip(sent, expected, strict=True):
        assert {k: got.get(k) for k in COMPARED} == {k: want.get(k) for k in COMPARED}
    # What a generic tokenizer would lose: the ChatML end of turn as a stop on raw completions, and
    # the DRY breakers and exemptions computed from the vocabulary.
    im_end = TokenizerInfo.load(BASE_DIR).special_id("<|im_end|>")
    assert im_end in sent[1]["stop_token_ids"]
    assert {xa.DRY_BREAKERS, xa.REP_EXEMPT} <= set(sent[0]["vllm_xargs"])
    assert "degraded" not in ready


async def test_remote_engine_without_model_files_says_what_is_degraded(
    tmp_path: Path, fake_url: tuple[FakeEngine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_hub_cache(monkeypatch, tmp_path / "empty-hub-cache")
    fake, url = fake_url
    fake.root = "some-org/model-not-on-this-machine"  # type: ignore[attr-defined]
    sent, ready = await _upstream_bodies(_settings(tmp_path, url), fake)
    assert ready["status"] == "ready"
    assert any("template stops" in line for line in ready["degraded"])
    assert any("breakers" in line for line in ready["degraded"])
    assert not sent[1].get("stop_token_ids")
    assert xa.DRY_BREAKERS not in sent[0]["vllm_xargs"]
