"""Token quotas hold however a request ends (issue 28, finding 1): a client that hangs up before the last
event (where the usage of a `decoding_preset: "off"` stream arrives), a deadline, an engine that dies, or a
non-streamed answer that never arrives: the key pays for what was generated, not nothing.

The quota clock is stopped in these tests, so no refill blurs what was charged."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from governor.bench.fake_engine import FakeEngine
from governor.serving.quota import Quotas
from tests.api.conftest import USER, Gateway, GatewayFactory, chat_body
from tests.api.test_request_path import bearer, served, wait_until

LONG = 200  # tokens a stream would have
READ = 180  # where the client hangs up: 90% of it
# A minute's allowance that 19 hang-ups at 90% leave positive and 20 spend (each ~184 tokens with the prompt).
TPM = 3600
IDENT = Quotas.client_id(USER, None)
assert IDENT is not None


async def _gateway(gateway: GatewayFactory, **overrides: Any) -> Gateway:
    gw = await gateway(fake=FakeEngine(stall_after=READ), api_keys=USER, key_tpm=TPM, **overrides)
    gw.app.state.service.quotas.clock = lambda: 1000.0
    return gw


def _quotas(gw: Gateway) -> Quotas:
    quotas: Quotas = gw.app.state.service.quotas
    return quotas


def _charged(gw: Gateway) -> float:
    usage = _quotas(gw).usage(IDENT)
    assert usage is not None
    return TPM - usage.tokens_left


async def _released(gw: Gateway) -> None:
    """Wait until the key has no request running (its lease released, its charge final)."""
    await wait_until(lambda: (u := _quotas(gw).usage(IDENT)) is not None and u.running == 0, 5, "the release")


async def _send(port: int, body: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """POST a chat request with the user key over a real socket (so that the client can hang up)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = orjson.dumps(body)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n" \
           f"Authorization: Bearer {USER}\r\nContent-Length: {len(raw)}\r\n\r\n"  # fmt: skip
    writer.write(head.encode() + raw)
    await writer.drain()
    return reader, writer


async def _hang_up(port: int, body: dict[str, Any], events: int) -> int:
    """Stream `body`, read `events` events, hang up; returns the events read."""
    reader, writer = await _send(port, body)
    received = b""
    async with asyncio.timeout(10):
        while received.count(b"data: ") < events:
            chunk = await reader.read(65536)
            assert chunk, f"the stream ended early: {received[-300:]!r}"
            received += chunk
    writer.close()
    await writer.wait_closed()
    return received.count(b"data: ")


@pytest.mark.parametrize("preset", ["off", "balanced"])  # usage only at the end; usage in every event
async def test_hang_ups_before_the_usage_event_are_charged_and_then_refused(
    gateway: GatewayFactory, preset: str
) -> None:
    gw = await _gateway(gateway)
    body = chat_body(max_tokens=LONG, stream=True, decoding_preset=preset)
    relayed = 0
    async with served(gw.app) as port:
        for _ in range(20):
            relayed += await _hang_up(port, body, READ)
            await _released(gw)
    assert gw.fake.aborted == 20
    assert relayed >= 20 * READ
    assert _charged(gw) >= 0.9 * relayed, f"charged {_charged(gw)} for {relayed} tokens relayed"
    r = await gw.client.post("/v1/chat/completions", json=chat_body(decoding_preset="off"), headers=bearer(USER))
    assert r.status_code == 429 and r.json()["error"]["code"] == "token_quota_exceeded", r.text


async def test_a_stream_past_its_deadline_pays_for_what_it_got(gateway: GatewayFactory) -> None:
    gw = await _gateway(gateway)
    headers = {**bearer(USER), "X-Governor-Timeout": "1"}
    body = chat_body(max_tokens=LONG, stream=True, decoding_preset="off")
    r = await gw.client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200 and b'"deadline_exceeded"' in r.content and r.content.endswith(b"data: [DONE]\n\n")
    got = r.content.count(b'"delta"')
    assert 0 < got <= READ  # all of them, unless the machine is too busy to relay them in time
    await _released(gw)
    assert _charged(gw) >= 0.9 * got


async def test_a_stream_cut_by_an_engine_that_dies_pays_for_what_it_got(gateway: GatewayFactory) -> None:
    gw = await _gateway(gateway)
    async with served(gw.app) as port:
        reader, writer = await _send(port, chat_body(max_tokens=LONG, stream=True, decoding_preset="off"))
        received = b""
        async with asyncio.timeout(10):
            while received.count(b"data: ") < READ:  # the client has them: the relay passed them on
                received += await reader.read(65536)
            server = gw.runner.server
            assert server is not None
            for connection in server.connections:  # the engine dies: its connections end without a word
                assert connection.transport is not None
                connection.transport.abort()
            while b"data: [DONE]" not in received:
                chunk = await reader.read(65536)
                assert chunk, received[-300:]
                received += chunk
        writer.close()
        await writer.wait_closed()
        await _released(gw)
    assert b'"engine_unavailable"' in received
    got = received.count(b'"delta"')
    assert got == READ
    assert _charged(gw) >= 0.9 * got


async def test_a_non_streamed_answer_that_never_arrives_keeps_its_charge(gateway: GatewayFactory) -> None:
    # preset off, no stream: vLLM's own non-streaming answer, which says nothing until it is complete
    gw = await _gateway(gateway)
    async with served(gw.app) as port:
        _, writer = await _send(port, chat_body(max_tokens=LONG, decoding_preset="off"))
        await wait_until(lambda: gw.fake.active == 1, 5, "the engine to start generating")
        writer.close()
        await writer.wait_closed()
        await _released(gw)
    assert _charged(gw) >= LONG  # what it was charged at admission: nothing says it used less
