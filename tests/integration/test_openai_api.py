"""Issue A acceptance against the real engine: the official openai client, curl-style HTTP, errors."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.conftest import Live, wait_for

pytestmark = pytest.mark.engine
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_models_lists_base(live: Live) -> None:
    client = openai.OpenAI(base_url=live.v1, api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert live.model in ids
    assert client.models.retrieve(live.model).id == live.model


def test_openai_sync_chat(live: Live) -> None:
    client = openai.OpenAI(base_url=live.v1, api_key="unused")
    reply = client.chat.completions.create(model=live.model, messages=QUESTION, max_tokens=20, temperature=0)
    assert "paris" in (reply.choices[0].message.content or "").lower()
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.model == live.model


def test_openai_sync_stream(live: Live) -> None:
    client = openai.OpenAI(base_url=live.v1, api_key="unused")
    stream = client.chat.completions.create(
        model=live.model, messages=QUESTION, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert "paris" in text.lower()
    assert usage is not None and usage.completion_tokens > 0
    assert finish in ("stop", "length")


def test_openai_async_chat_and_stream(live: Live) -> None:
    async def go() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=live.v1, api_key="unused")
        reply = await client.chat.completions.create(model=live.model, messages=QUESTION, max_tokens=20, temperature=0)
        stream = await client.chat.completions.create(
            model=live.model, messages=QUESTION, max_tokens=20, temperature=0, stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return reply.choices[0].message.content or "", "".join(parts)

    plain, streamed = asyncio.run(go())
    assert "paris" in plain.lower()
    assert "paris" in streamed.lower()


def test_completions_plain_and_stream(live: Live) -> None:
    client = openai.OpenAI(base_url=live.v1, api_key="unused")
    reply = client.completions.create(model=live.model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.choices[0].text.strip()
    chunks = list(client.completions.create(model=live.model, prompt="One, two,", max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()


def test_curl_style_http_and_request_id(live: Live) -> None:
    body = {"model": live.model, "messages": QUESTION, "max_tokens": 10}
    r = httpx.post(live.v1 + "/chat/completions", json=body, headers={"X-Request-Id": "abc-123"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["object"] == "chat.completion"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "no-such-model", "messages": QUESTION}, 404, "model"),
        ({"messages": 5}, 400, None),
        ({"model": "SmolLM2-135M-Instruct", "messages": 5}, 400, "messages"),
        ({"model": "SmolLM2-135M-Instruct", "messages": []}, 400, "messages"),
        ({"model": "SmolLM2-135M-Instruct", "messages": QUESTION, "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "SmolLM2-135M-Instruct", "messages": QUESTION, "vllm_xargs": {"a": 1}}, 400, "vllm_xargs"),
        ({"model": "SmolLM2-135M-Instruct", "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
        ({"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": {"x": 1}}]}, 400, None),
    ],
)
def test_bad_requests_get_envelopes(live: Live, body: dict[str, object], status: int, param: str | None) -> None:
    r = httpx.post(live.v1 + "/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param


@pytest.mark.parametrize(
    ("raw", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        (b"\xff\xfe", 400, "invalid_json", None),  # not UTF-8
        (b'{"model": "x"}{', 400, "invalid_json", None),  # trailing bytes after the object
        (b"[]", 400, "invalid_json", None),  # JSON, but not an object
        (b"null", 400, "invalid_json", None),
        (b'"text"', 400, "invalid_json", None),
        ('{"model": "\u00e9"}'.encode(), 400, None, "messages"),  # the body is checked before the model
        ('{"model": "\u00e9", "messages": [{"role": "user", "content": "hi"}]}'.encode(), 404, "model_not_found",
         "model"),
    ],
)  # fmt: skip
def test_malformed_bodies_get_their_own_status(
    live: Live, raw: bytes, status: int, code: str | None, param: str | None
) -> None:
    r = httpx.post(live.v1 + "/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == "invalid_request_error"


def test_prompt_too_long_is_400_not_500(live: Live) -> None:
    body = {"model": live.model, "prompt": "word " * 6000, "max_tokens": 4}
    r = httpx.post(live.v1 + "/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def _running(live: Live) -> float:
    text = httpx.get(live.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("governor_engine_num_requests_running{"):  # vLLM's own count
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_client_disconnect_aborts_upstream(live: Live) -> None:
    # preset off: under the default one the counting loop may be cut (which also ends the request) first
    body = {"model": live.model, "prompt": "Count forever:", "max_tokens": 2000, "ignore_eos": True, "stream": True,
            "decoding_preset": "off"}  # fmt: skip
    with httpx.Client(timeout=60) as client, client.stream("POST", live.v1 + "/completions", json=body) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()  # kept referenced: breaking out of a loop over it would close the connection
        assert next(chunks)  # first bytes arrived: the engine is generating
        wait_for(lambda: _running(live) >= 1, 10, what="the request to run in vLLM")
    # the client is gone (the response closed); Governor's engine metrics are refreshed once a second
    wait_for(lambda: _running(live) == 0, 5, what="vLLM to abort the disconnected request")


def test_deadline_gives_504(live: Live) -> None:
    body = {"model": live.model, "prompt": "Tell a long story:", "max_tokens": 3000, "ignore_eos": True}
    started = time.monotonic()
    r = httpx.post(live.v1 + "/completions", json=body, headers={"X-Governor-Timeout": "1"}, timeout=60)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 10
    body["stream"] = True
    r = httpx.post(live.v1 + "/completions", json=body, headers={"X-Governor-Timeout": "1"}, timeout=60)
    events = [e for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "deadline_exceeded"
    wait_for(lambda: _running(live) == 0, 5, what="vLLM to abort the timed-out requests")
