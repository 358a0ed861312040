"""/ready's generation probe is a request under the default preset: an engine that refuses Governor's
processor arguments (as vLLM 0.25 refused id lists in completions' vllm_xargs) is not ready."""

from __future__ import annotations

from aiohttp import web

from governor.bench.fake_engine import FakeEngine
from tests.api.conftest import GatewayFactory


class ScalarXargsFake(FakeEngine):
    """A fake engine that, like vLLM 0.25's CompletionRequest, refuses non-scalar vllm_xargs values."""

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        values = (body.get("vllm_xargs") or {}).values()
        if any(not isinstance(v, str | int | float) for v in values):
            return web.json_response({"error": {"message": "vllm_xargs: bad value"}}, status=400)
        return await super().completions(request)


class RefusingFake(FakeEngine):
    """A fake engine started without Governor's processors' support: any vllm_xargs is refused."""

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if "vllm_xargs" in await request.json():
            return web.json_response({"error": {"message": "unknown processor arguments"}}, status=400)
        return await super().completions(request)


async def test_an_engine_that_accepts_the_default_presets_arguments_is_ready(gateway: GatewayFactory) -> None:
    gw = await gateway(fake=ScalarXargsFake())
    reply = await gw.client.get("/ready")
    assert reply.status_code == 200, reply.text
    probe = gw.fake.requests[-1]
    assert probe["vllm_xargs"], "the probe carries the default preset's processor arguments"


async def test_an_engine_that_refuses_processor_arguments_is_not_ready(gateway: GatewayFactory) -> None:
    gw = await gateway(fake=RefusingFake(), ready_cache_seconds=0)
    reply = await gw.client.get("/ready")
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "not_ready"


async def test_the_off_preset_probes_without_processor_arguments(gateway: GatewayFactory) -> None:
    gw = await gateway(fake=RefusingFake(), default_preset="off")
    assert (await gw.client.get("/ready")).status_code == 200
