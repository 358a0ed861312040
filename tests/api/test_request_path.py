"""The request path in front of the fake engine: every outcome counted, disconnects abort non-streaming
requests, admission in sequences, per-address limits, request ids, the admin API's body, docs off."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI

from governor.engine.process import free_port
from tests.api.conftest import ADMIN, USER, GatewayFactory, chat_body, chunked


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def requests_total(metrics: str, status: str) -> float:
    """governor_requests_total summed over models and endpoints for one status."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("governor_requests_total{") and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_until(predicate: Any, timeout: float, what: str) -> float:
    """Poll until predicate() holds; returns the seconds it took (fails past `timeout`)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[int]:
    """The app behind a real uvicorn listener (its lifespan already runs in the fixture)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started, 10, "uvicorn to start")
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def test_refusals_are_counted(gateway: GatewayFactory) -> None:
    gw = await gateway(api_keys=USER, key_rpm=1)
    ok = await gw.client.post("/v1/chat/completions", json=chat_body(), headers=bearer(USER))
    assert ok.status_code == 200
    quota = await gw.client.post("/v1/chat/completions", json=chat_body(), headers=bearer(USER))
    assert quota.status_code == 429
    bad_timeout = await gw.client.post("/v1/chat/completions", json=chat_body(),
                                       headers={**bearer(USER), "X-Governor-Timeout": "soon"})  # fmt: skip
    assert bad_timeout.status_code in (400, 429)  # the quota is spent; either refusal must be counted
    malformed = await gw.client.post("/v1/chat/completions", content=b"{", headers=bearer(USER))
    assert malformed.status_code == 400
    wrong_key = await gw.client.post("/v1/chat/completions", json=chat_body(), headers=bearer("nope"))
    assert wrong_key.status_code == 401
    metrics = (await gw.client.get("/metrics")).text
    assert requests_total(metrics, "200") == 1 and requests_total(metrics, "401") == 1
    assert requests_total(metrics, "429") + requests_total(metrics, "400") == 3
    assert "governor_requests_in_flight 0.0" in metrics


async def test_bad_timeout_header_is_counted_as_400(gateway: GatewayFactory) -> None:
    gw = await gateway()
    r = await gw.client.post("/v1/chat/completions", json=chat_body(), headers={"X-Governor-Timeout": "-1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Governor-Timeout"
    assert requests_total((await gw.client.get("/metrics")).text, "400") == 1


async def _disconnect_while_generating(gw: Any, body: dict[str, Any]) -> float:
    """Send a non-streaming request over a real socket, hang up once the engine generates; return the
    seconds until the engine saw the abort."""
    async with served(gw.app) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = orjson.dumps(body)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))  # fmt: skip
        await writer.drain()
        await wait_until(lambda: gw.fake.active >= 1, 10, "the engine to start generating")
        writer.close()
        await writer.wait_closed()
        took = await wait_until(lambda: gw.fake.active == 0 and gw.fake.aborted >= 1, 10, "the engine abort")
        metrics = (await gw.client.get("/metrics")).text
        assert requests_total(metrics, "499") == 1
        assert "governor_requests_in_flight 0.0" in metrics
        assert gw.pool.outstanding() == 0
        return took


async def test_non_streaming_disconnect_aborts_upstream(gateway: GatewayFactory) -> None:
    gw = await gateway(delay=0.05)  # 400 tokens at 20/s: 20 s unless the abort comes
    body = {"model": "fake-model", "prompt": "Count:", "max_tokens": 400}
    assert await _disconnect_while_generating(gw, body) < 10  # half the generation: it was aborted


async def test_engine_budget_counts_sequences(gateway: GatewayFactory) -> None:
    gw = await gateway(delay=0.05, max_running=3, max_queued=0)
    too_big = {"model": "fake-model", "prompt": ["a", "b", "c", "d"], "max_tokens": 2}
    r = await gw.client.post("/v1/completions", json=too_big)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    slow = asyncio.create_task(
        gw.client.post("/v1/completions", json={**too_big, "prompt": ["a", "b"], "max_tokens": 60})
    )
    await wait_until(lambda: gw.pool.outstanding() == 2, 5, "two sequences admitted")
    r = await gw.client.post("/v1/completions", json={**too_big, "prompt": ["a", "b"]})
    assert r.status_code == 429 and "retry-after" in r.headers  # 2 + 2 sequences > 3
    r = await gw.client.post("/v1/completions", json={**too_big, "prompt": "a"})
    assert r.status_code == 200  # 2 + 1 fits
    assert (await slow).status_code == 200
    assert gw.pool.outstanding() == 0


async def test_request_sequence_cap_names_the_field(gateway: GatewayFactory) -> None:
    gw = await gateway(max_request_sequences=8)
    r = await gw.client.post("/v1/completions", json={"model": "fake-model", "prompt": ["x"] * 3, "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["code"] == "too_many_sequences"
    r = await gw.client.post("/v1/chat/completions", json=chat_body(n=8))
    assert r.status_code == 200


async def test_address_concurrency_without_keys(gateway: GatewayFactory) -> None:
    gw = await gateway(delay=0.05, address_concurrency=1)
    slow = asyncio.create_task(gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=60)))
    await wait_until(lambda: gw.pool.outstanding() == 1, 5, "the first request admitted")
    # a made-up key does not make a new client when no keys are configured
    r = await gw.client.post("/v1/chat/completions", json=chat_body(), headers=bearer("made-up"))
    assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_exceeded"
    assert (await slow).status_code == 200
    assert (await gw.client.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_token_quota_charges_at_admission(gateway: GatewayFactory) -> None:
    gw = await gateway(delay=0.05, api_keys=USER, key_tpm=100)
    # 60 expected tokens are charged at once: a concurrent second request finds the bucket spent
    slow = asyncio.create_task(gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=120),
                                              headers=bearer(USER)))  # fmt: skip
    await wait_until(lambda: gw.pool.outstanding() == 1, 5, "the first request admitted")
    r = await gw.client.post("/v1/chat/completions", json=chat_body(), headers=bearer(USER))
    assert r.status_code == 429 and r.json()["error"]["code"] == "token_quota_exceeded"
    assert (await slow).status_code == 200


async def test_request_ids_are_sanitised(gateway: GatewayFactory) -> None:
    gw = await gateway()
    good = await gw.client.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "abc-1.2:3_x"})
    assert good.headers["x-request-id"] == "abc-1.2:3_x"
    for forged in ("x status=200 adapter=admin", "a" * 129, "id\tone", "a/b", ""):
        r = await gw.client.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": forged})
        assert r.status_code == 200
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), r.headers["x-request-id"]


async def _never_sends_body(app: FastAPI, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """POST with a declared 10 MB body that never arrives: only a route that refuses first can answer."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the body never comes
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    raw_headers = [(k.lower().encode(), v.encode()) for k, v in {**headers, "content-length": "10000000"}.items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": raw_headers, "client": ("127.0.0.1", 1),
             "server": ("gw", 80), "scheme": "http", "root_path": "", "app": app}  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 5)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, orjson.loads(body)


async def test_admin_refuses_before_reading_the_body(gateway: GatewayFactory) -> None:
    off = await gateway()
    status, body = await _never_sends_body(off.app, "/admin/adapters", bearer("anything"))
    assert status == 403 and body["error"]["code"] == "admin_disabled"
    on = await gateway(admin_key=ADMIN, api_keys=USER)
    for key, expected in ((None, 401), ("wrong", 401), (USER, 403)):
        status, body = await _never_sends_body(on.app, "/admin/adapters", bearer(key) if key else {})
        assert status == expected, body
    r = await on.client.post("/admin/adapters", content=b"x" * (65 * 1024), headers=bearer(ADMIN))
    assert r.status_code == 413
    r = await on.client.post("/admin/adapters", content=chunked(b"x" * (65 * 1024)), headers=bearer(ADMIN))
    assert "content-length" not in r.request.headers and r.status_code == 413  # counted as it arrives
    r = await on.client.post("/admin/adapters", json={"name": "a"}, headers=bearer(ADMIN))
    assert r.status_code == 400 and r.json()["error"]["param"] == "path"


async def test_v1_bodies_are_bounded_before_they_are_read(gateway: GatewayFactory) -> None:
    gw = await gateway()
    status, body = await _never_sends_body(gw.app, "/v1/chat/completions", {})
    assert status == 413 and body["error"]["code"] == "payload_too_large"


async def test_docs_off_unless_enabled(gateway: GatewayFactory) -> None:
    off = await gateway()
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert (await off.client.get(path)).status_code == 404
    schema = off.app.openapi()  # in-process, for the fuzz tests
    assert "/v1/chat/completions" in schema["paths"] and "ChatCompletionRequest" in schema["components"]["schemas"]
    on = await gateway(docs=True)
    assert (await on.client.get("/openapi.json")).status_code == 200
    assert (await on.client.get("/docs")).status_code == 200


async def test_client_fields_reach_the_engine_as_documented(gateway: GatewayFactory) -> None:
    gw = await gateway(api_keys=USER, cache_salt_per_key=True)
    sent = chat_body(metadata={"a": "b"}, store=False, service_tier="auto", user="u1", seed=3, logit_bias={"5": 1})
    r = await gw.client.post("/v1/chat/completions", json=sent, headers=bearer(USER))
    assert r.status_code == 200, r.text
    upstream = gw.fake.requests[-1]
    assert upstream["user"] == "u1" and upstream["seed"] == 3 and upstream["logit_bias"] == {"5": 1}
    assert not {"metadata", "store", "service_tier"} & set(upstream)  # accepted, not forwarded
    salt = upstream["cache_salt"]
    await gw.client.post("/v1/chat/completions", json=chat_body(), headers=bearer(USER))
    assert gw.fake.requests[-1]["cache_salt"] == salt and USER not in salt
    r = await gw.client.post("/v1/chat/completions", json=chat_body(cache_salt="mine"), headers=bearer(USER))
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


async def test_unknown_fields_are_refused_unless_allowed(gateway: GatewayFactory) -> None:
    gw = await gateway()
    r = await gw.client.post("/v1/chat/completions", json=chat_body(frobnicate=1))
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    allowed = await gateway(allow_fields="frobnicate,priority")
    r = await allowed.client.post("/v1/chat/completions", json=chat_body(frobnicate=1, priority=-5))
    assert r.status_code == 200
    assert allowed.fake.requests[-1]["frobnicate"] == 1 and allowed.fake.requests[-1]["priority"] == -5
    assert "cache_salt" not in allowed.fake.requests[-1]  # no API keys: no per-key salt


async def test_streaming_and_plain_answers_still_work(gateway: GatewayFactory) -> None:
    gw = await gateway()
    r = await gw.client.post("/v1/completions", json={"model": "fake-model", "prompt": ["a", "b"], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    async with gw.client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as s:
        text = "".join([chunk async for chunk in s.aiter_text()])
    assert text.rstrip().endswith("data: [DONE]")
    assert gw.pool.outstanding() == 0
