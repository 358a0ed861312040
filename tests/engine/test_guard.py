"""EngineKeyGuard on a small Starlette app shaped like vLLM's (a guarded-by-vLLM /v1 route, the SageMaker
LoRA routes, a mounted ASGI app, a WebSocket), added the way vLLM's `--middleware` adds it: by class, with
the key from the environment. Nothing reaches a handler without the key."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from governor.engine.guard import GUARD_FLAGS, KEY_ENV, MIDDLEWARE_PATH, EngineKeyGuard

KEY = "engine-key-" + "k" * 32
ROUTES = [("POST", "/v1/completions"), ("POST", "/adapters"), ("DELETE", "/adapters/a1"), ("POST", "/invocations"),
          ("GET", "/health"), ("GET", "/metrics/"), ("GET", "/no-such-route"), ("OPTIONS", "/invocations"),
          ("HEAD", "/health")]  # fmt: skip
NOT_THE_KEY = [
    {},
    {"Authorization": "Bearer not-the-key"},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": KEY},
    {"Authorization": "Bearer "},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY[:-1]}"},
]


def engine_like_app(reached: list[str]) -> Starlette:
    """Handlers that record every request that got through; vLLM adds the guard by class, as here."""

    async def handler(request: Request) -> JSONResponse:
        reached.append(f"{request.method} {request.url.path}")
        return JSONResponse({"ok": True})

    async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append("GET /metrics/")
        await PlainTextResponse("vllm:num_requests_running 0\n")(scope, receive, send)

    async def socket(ws: WebSocket) -> None:
        reached.append("WS /v1/realtime")
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    app = Starlette(
        routes=[
            Route("/v1/completions", handler, methods=["POST"]),
            Route("/adapters", handler, methods=["POST"]),
            Route("/adapters/{name}", handler, methods=["DELETE"]),
            Route("/invocations", handler, methods=["POST"]),
            Route("/health", handler, methods=["GET"]),
            Mount("/metrics", metrics_app),
            WebSocketRoute("/v1/realtime", socket),
        ]
    )
    module_path, name = MIDDLEWARE_PATH.rsplit(".", 1)  # what vLLM's --middleware does with the flag
    app.add_middleware(getattr(importlib.import_module(module_path), name))
    return app


@pytest_asyncio.fixture(loop_scope="function")
async def guarded(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[httpx.AsyncClient, list[str]]]:
    monkeypatch.setenv(KEY_ENV, KEY)
    reached: list[str] = []
    transport = httpx.ASGITransport(app=engine_like_app(reached))
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
        yield client, reached


async def test_every_route_and_method_refused_without_the_key(guarded: tuple[httpx.AsyncClient, list[str]]) -> None:
    client, reached = guarded
    for method, path in ROUTES:
        for headers in NOT_THE_KEY:
            reply = await client.request(method, path, headers=headers, json=None if method in ("GET", "HEAD") else {})
            assert reply.status_code == 401, (method, path, headers)
            assert reply.headers["www-authenticate"] == "Bearer"
            if method != "HEAD":
                assert reply.json() == {"error": "Unauthorized"}
    assert reached == []


async def test_the_key_passes_on_every_route(guarded: tuple[httpx.AsyncClient, list[str]]) -> None:
    client, reached = guarded
    for scheme in ("Bearer", "bearer"):
        auth = {"Authorization": f"{scheme} {KEY}"}
        assert (await client.post("/adapters", json={}, headers=auth)).status_code == 200
        assert (await client.delete("/adapters/a1", headers=auth)).status_code == 200
        assert (await client.get("/metrics/", headers=auth)).text.startswith("vllm:")
        assert (await client.get("/no-such-route", headers=auth)).status_code == 404  # the app's own answer
    assert reached == ["POST /adapters", "DELETE /adapters/a1", "GET /metrics/"] * 2


async def test_a_repeated_authorization_header_is_refused(guarded: tuple[httpx.AsyncClient, list[str]]) -> None:
    """Two headers, one of them right: which one a server reads varies, so neither is trusted."""
    client, reached = guarded
    headers = [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {KEY}")]
    assert (await client.post("/invocations", json={}, headers=headers)).status_code == 401
    assert reached == []


def test_websocket_closed_without_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    reached: list[str] = []
    with TestClient(engine_like_app(reached)) as client:  # the context runs the lifespan through the guard
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/v1/realtime"):
            pass
        assert refused.value.code == 1008
        with client.websocket_connect("/v1/realtime", headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert ws.receive_text() == "hello"
    assert reached == ["WS /v1/realtime"]


def test_no_key_no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a key the guard fails the app's start (vLLM builds its middleware stack at start)."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    app = engine_like_app([])
    with pytest.raises(RuntimeError, match=KEY_ENV):
        app.build_middleware_stack()
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(RuntimeError, match=KEY_ENV):
        EngineKeyGuard(app)


def test_the_flag_names_the_guard_and_importing_it_pulls_in_nothing_heavy() -> None:
    """The engine imports the guard by this path; it must not drag the gateway (or anything) in with it."""
    assert GUARD_FLAGS == ("--middleware", "governor.engine.guard.EngineKeyGuard")
    code = (
        "import sys, governor.engine.guard\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'governor', 'starlette', 'fastapi', 'pydantic', 'aiohttp', 'httpx', 'vllm', 'torch'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "['governor', 'governor.engine', 'governor.engine.guard']"
