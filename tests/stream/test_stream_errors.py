"""Nothing vanishes: every failure inside a relayed response reaches the client, the log and the counter.

Upstream streams are in memory here (the shapes are vLLM's: see governor.bench.fake_engine.FAULTS);
tests/stream/test_errors_http.py sends the same failures through a running gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import orjson
import pytest

from governor.api.sse_response import SSEResponse
from governor.bench.fake_engine import FAULTS, GARBAGE_EVENT
from governor.errors import EngineUnavailable, InvalidRequest
from governor.stream.loop_detector import LoopConfig
from governor.stream.relay import REASONS, Relay
from governor.stream.sse import tail_error
from tests.stream.test_relay import PROSE, MemoryUpstream, chat_events, drain, rechunk

PRESETS = {"off": None, "balanced": LoopConfig()}  # the byte path and the checked path


def vllm_error_event(fault: str = "error") -> bytes:
    """Exactly what vLLM writes: json.dumps of ErrorResponse.model_dump() (spaces after separators)."""
    return b"data: " + json.dumps({"error": FAULTS[fault]}).encode() + b"\n\n"


def failing_stream(fault_event: bytes, usage_each: bool) -> list[bytes]:
    """Three tokens, the fault, then what vLLM sends after an error event ([DONE])."""
    events = chat_events(PROSE[:3], usage_each=usage_each, done=False)[:-1]  # no finish, no usage chunk
    head = [e.replace(b'"finish_reason":"length"', b'"finish_reason":null') for e in events]
    return [*head, fault_event, b"data: [DONE]\n\n"]


class Counted:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)


def relay_for(chunks: list[bytes], preset: str, counted: Counted, client_usage: bool = False) -> Relay:
    return Relay(MemoryUpstream(chunks), kind="chat", n=1, loop=PRESETS[preset], client_usage=client_usage,
                 client_continuous=False, request_id="req-42", on_error=counted)  # fmt: skip


def text_of(events: list[Any]) -> str:
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)


@pytest.mark.parametrize("preset", ["off", "balanced"])
@pytest.mark.parametrize("how", ["events", "whole", "bytes"])
async def test_vllm_error_event_reaches_streaming_client(preset: str, how: str) -> None:
    counted = Counted()
    up_chunks = rechunk(failing_stream(vllm_error_event(), usage_each=preset == "balanced"), how)
    relay = relay_for(up_chunks, preset, counted, client_usage=True)
    events = await drain(relay)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error == {"message": FAULTS["error"]["message"], "type": "invalid_request_error",
                     "param": "stop_token_ids", "code": None}  # fmt: skip
    assert text_of(events) == "".join(PROSE[:3])  # what came before the error was delivered
    assert sum("error" in e for e in events if e != "[DONE]") == 1
    assert relay.stats.outcome == "error" and relay.stats.error == "upstream_error"
    assert counted.reasons == ["upstream_error"]


@pytest.mark.parametrize("preset", ["off", "balanced"])
async def test_vllm_generation_error_is_a_server_error_event(preset: str) -> None:
    counted = Counted()
    events = await drain(relay_for(failing_stream(vllm_error_event("error500"), False), preset, counted))
    assert events[-2]["error"]["code"] == "engine_unavailable"
    assert events[-2]["error"]["type"] == "server_error"
    assert "Internal server error" in events[-2]["error"]["message"]
    assert counted.reasons == ["upstream_error"]


@pytest.mark.parametrize("preset", ["off", "balanced"])
async def test_collect_turns_vllm_error_event_into_error_not_200(preset: str) -> None:
    counted = Counted()
    relay = relay_for(failing_stream(vllm_error_event(), usage_each=True), preset, counted)
    with pytest.raises(InvalidRequest) as caught:
        await relay.collect()
    assert caught.value.status == 400 and caught.value.message == FAULTS["error"]["message"]
    assert caught.value.param == "stop_token_ids"
    relay = relay_for(failing_stream(vllm_error_event("error500"), usage_each=True), preset, counted)
    with pytest.raises(EngineUnavailable):
        await relay.collect()
    assert counted.reasons == ["upstream_error", "upstream_error"]
    assert relay.upstream.aborted  # type: ignore[attr-defined]


async def test_garbage_event_ends_checked_stream_with_error_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted = Counted()
    with caplog.at_level(logging.WARNING, logger="governor.stream"):
        events = await drain(relay_for(failing_stream(GARBAGE_EVENT, True), "balanced", counted))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "bad_upstream_event"
    assert counted.reasons == ["bad_event"]
    record = next(r for r in caplog.records if r.getMessage().startswith("stream failed"))
    assert record.request_id == "req-42" and record.reason == "bad_event"  # type: ignore[attr-defined]
    assert record.exc_info is not None  # the parse error's traceback is in the log


async def test_garbage_event_is_relayed_verbatim_by_the_byte_path() -> None:
    # preset off relays bytes without parsing them: the client sees exactly what the engine sent
    counted = Counted()
    relay = relay_for(failing_stream(GARBAGE_EVENT, False), "off", counted)
    out = b"".join([chunk async for chunk in relay.stream()])
    assert GARBAGE_EVENT in out and out.endswith(b"data: [DONE]\n\n")
    assert counted.reasons == []


async def test_collect_with_garbage_event_raises_governor_error() -> None:
    counted = Counted()
    relay = relay_for(failing_stream(GARBAGE_EVENT, True), "balanced", counted)
    with pytest.raises(EngineUnavailable) as caught:
        await relay.collect()
    assert caught.value.code == "bad_upstream_event"
    assert counted.reasons == ["bad_event"]


class BrokenUpstream(MemoryUpstream):
    async def chunks(self) -> AsyncIterator[bytes]:
        yield chat_events(["a"], done=False)[0]
        raise RuntimeError("a bug somewhere below the relay")


@pytest.mark.parametrize("preset", ["off", "balanced"])
async def test_any_exception_mid_stream_is_an_error_event(preset: str) -> None:
    counted = Counted()
    relay = Relay(BrokenUpstream([]), kind="chat", n=1, loop=PRESETS[preset], client_usage=False,
                  client_continuous=False, request_id="req-7", on_error=counted)  # fmt: skip
    events = await drain(relay)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "internal_error"
    assert relay.stats.outcome == "error" and counted.reasons == ["internal"]


async def test_truncated_stream_is_counted_as_engine_unavailable() -> None:
    counted = Counted()
    truncated = chat_events(["a", "b"], done=False)[:-1]
    await drain(relay_for(truncated, "balanced", counted))
    assert counted.reasons == ["engine_unavailable"]
    assert set(counted.reasons) <= set(REASONS)


async def test_text_mentioning_error_is_not_an_error_event() -> None:
    texts = ['The "error" key ', '{"error": 1} ', "is just text here. "]
    counted = Counted()
    for preset in PRESETS:
        events = await drain(relay_for(chat_events(texts), preset, counted))
        assert text_of(events) == "".join(texts) and events[-1] == "[DONE]"
    assert counted.reasons == []


def test_tail_error_keeps_events_before_it() -> None:
    ok = chat_events(["x"], done=False)[0]
    before, error = tail_error(ok + vllm_error_event())
    assert before == ok and isinstance(error, InvalidRequest)
    assert tail_error(vllm_error_event())[0] == b""
    assert tail_error(ok) == (ok, None)
    not_error = b'data: {"id": "c", "choices": [], "error": "x"}\n\n'  # has choices: not an error event
    assert tail_error(not_error) == (not_error, None)
    assert tail_error(ok + GARBAGE_EVENT.replace(b"cut", b'"error"'))[1] is None  # unreadable: not an error


@pytest.mark.parametrize("preset", ["off", "balanced"])
async def test_error_event_in_the_middle_of_a_block(preset: str) -> None:
    # vLLM sends its error last; another upstream might not: parsed paths catch it anywhere, the byte
    # path forwards it as it came
    counted = Counted()
    chunks = [b"".join(failing_stream(vllm_error_event(), usage_each=True)[:-1] + chat_events(["more"]))]
    events = await drain(relay_for(chunks, preset, counted))
    assert any("error" in e for e in events if e != "[DONE]") and events[-1] == "[DONE]"
    if preset == "balanced":
        assert events[-2]["error"]["param"] == "stop_token_ids" and counted.reasons == ["upstream_error"]
    with pytest.raises(InvalidRequest):
        await relay_for(chunks, preset, counted).collect()


async def _run_asgi(response: SSEResponse) -> list[MutableMapping[str, Any]]:
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await response({"type": "http"}, receive, send)
    return sent


async def test_sse_response_ends_a_failing_body_with_error_and_done(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'data: {"ok":1}\n\n'
        raise ValueError("not from the relay")

    closed = []
    response = SSEResponse(body(), headers={"X-Request-Id": "req-9"}, on_close=lambda: closed.append(1))
    with caplog.at_level(logging.ERROR, logger="governor.stream"):
        sent = await _run_asgi(response)
    data = b"".join(m.get("body", b"") for m in sent)
    assert data.startswith(b'data: {"ok":1}\n\n') and data.endswith(b"data: [DONE]\n\n")
    error = orjson.loads(data.split(b"\n\n")[1][6:])["error"]
    assert error["code"] == "internal_error" and error["message"]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert closed == [1]
    assert any(getattr(r, "request_id", None) == "req-9" for r in caplog.records)
