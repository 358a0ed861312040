"""Through the whole gateway: an engine that drops one request's connection (DroppingFakeEngine, a fake
whose /health stays 200) costs that request a clean 503 envelope and nothing else (GPU run: hundreds of
503s followed one ServerDisconnectedError)."""

from __future__ import annotations

import asyncio

import httpx

from governor.engine.base import EngineState
from tests.api.conftest import USER, GatewayFactory, chat_body
from tests.engine.dropping_engine import DROP, DroppingFakeEngine

AUTH = {"Authorization": f"Bearer {USER}"}


async def test_a_dropped_connection_fails_only_its_own_request(gateway: GatewayFactory) -> None:
    gw = await gateway(fake=DroppingFakeEngine(), api_keys=[USER])
    bodies = [chat_body(stream=i % 2 == 0) for i in range(30)]
    bodies[11]["messages"] = [{"role": "user", "content": f"please {DROP}"}]

    async def send(body: dict[str, object]) -> httpx.Response:
        return await gw.client.post("/v1/chat/completions", json=body, headers=AUTH)

    answers = await asyncio.gather(*(send(b) for b in bodies))
    dropped, streamed = answers.pop(11), [bool(b.get("stream")) for i, b in enumerate(bodies) if i != 11]
    assert dropped.status_code == 503
    error = dropped.json()["error"]
    assert error["code"] == "engine_unavailable" and error["type"] == "server_error" and error["message"]
    assert [a.status_code for a in answers] == [200] * 29
    assert all(b"[DONE]" in a.content for a, s in zip(answers, streamed, strict=True) if s)  # ran to their end
    engine = gw.pool.engines[0]
    assert engine.state == EngineState.READY and engine.generation == 1
    again = await send(chat_body())
    assert again.status_code == 200
