"""Engine failures through a running gateway (`governor serve`, real HTTP) in front of the fake engine:
the fake fails on request the way vLLM does (an error event mid-stream, an error body, an unreadable
event), under the byte path (`off`) and the checked path (`balanced`), streaming and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from governor.bench.fake_engine import FAULTS, GARBAGE_EVENT, MODEL
from tests.fuzz_support import fake_backed_governor


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with fake_backed_governor() as gateway_url:
        yield gateway_url


def body(fault: str, preset: str, stream: bool, kind: str = "chat") -> dict[str, Any]:
    ask = f"Say something [fake-fault:{fault}]"
    prompt: dict[str, Any] = {"messages": [{"role": "user", "content": ask}]} if kind == "chat" else {"prompt": ask}
    return {"model": MODEL, **prompt, "max_tokens": 12, "stream": stream, "decoding_preset": preset}


def events(text: str) -> list[Any]:
    out: list[Any] = []
    for part in text.split("\n\n"):
        if part.startswith("data: "):
            out.append("[DONE]" if part == "data: [DONE]" else json.loads(part[6:]))
    return out


def stream_errors(url: str) -> dict[str, float]:
    counts = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("governor_stream_errors_total{"):
            counts[line.split('reason="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def assert_envelope(error: dict[str, Any]) -> None:
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error


@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize("preset", ["off", "balanced"])
def test_vllm_error_event_reaches_streaming_client(url: str, preset: str, kind: str) -> None:
    before = stream_errors(url).get("upstream_error", 0)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    r = httpx.post(url + path, json=body("error", preset, True, kind), timeout=30)
    assert r.status_code == 200  # the stream had started
    got = events(r.text)
    assert got[-1] == "[DONE]"
    assert_envelope(got[-2]["error"])
    assert got[-2]["error"]["message"] == FAULTS["error"]["message"]
    assert got[-2]["error"]["param"] == "stop_token_ids"
    assert all("choices" in e for e in got[:-2])  # the tokens before it, then the error
    assert stream_errors(url)["upstream_error"] == before + 1


@pytest.mark.parametrize("preset", ["off", "balanced"])
@pytest.mark.parametrize(("fault", "status"), [("error", 400), ("error500", 503)])
def test_vllm_error_is_an_error_response_not_200(url: str, preset: str, fault: str, status: int) -> None:
    r = httpx.post(url + "/v1/chat/completions", json=body(fault, preset, False), timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert_envelope(error)
    assert FAULTS[fault]["message"] in error["message"]


def test_unreadable_event_ends_checked_stream_with_error_and_done(url: str) -> None:
    before = stream_errors(url).get("bad_event", 0)
    r = httpx.post(url + "/v1/chat/completions", json=body("garbage", "balanced", True), timeout=30)
    got = events(r.text)
    assert got[-1] == "[DONE]" and got[-2]["error"]["code"] == "bad_upstream_event"
    assert_envelope(got[-2]["error"])
    assert stream_errors(url)["bad_event"] == before + 1
    r = httpx.post(url + "/v1/chat/completions", json=body("garbage", "balanced", False), timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "bad_upstream_event"


def test_unreadable_event_reaches_the_client_as_sent_under_off(url: str) -> None:
    # the byte path does not parse: the client sees the engine's bytes, then the rest of the stream
    r = httpx.post(url + "/v1/chat/completions", json=body("garbage", "off", True), timeout=30)
    assert GARBAGE_EVENT in r.content and r.text.endswith("data: [DONE]\n\n")
    # without streaming, `off` asks the engine for a plain answer, which is unreadable here: an error, not a 200
    r = httpx.post(url + "/v1/chat/completions", json=body("garbage", "off", False), timeout=30)
    assert r.status_code == 503, r.text
    assert_envelope(r.json()["error"])


def test_gateway_still_serves_after_failures(url: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", json=body("none", "balanced", False), timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
