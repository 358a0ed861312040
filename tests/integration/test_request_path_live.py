"""The request path against the real engine: a client that leaves a non-streaming request stops it in
vLLM within 2 s, and a batch beyond the per-request sequence cap is refused before the engine sees it."""

from __future__ import annotations

import socket
import time

import httpx
import orjson
import pytest

from tests.conftest import Live, wait_for

pytestmark = pytest.mark.engine


def running(live: Live) -> tuple[float, float, float]:
    """(sequences running in vLLM, when vLLM was read, requests Governor has running) from Governor's
    /metrics: the engine's gauge is re-exported from a copy refreshed in the background, whose age says
    when the engine was read; `vllm:num_requests_running` there is Governor's own request state."""
    asked = time.monotonic()
    text = httpx.get(live.url + "/metrics", timeout=10).text
    engine, age, own = 0.0, 0.0, 0.0
    for line in text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith("governor_engine_num_requests_running{"):
            engine += float(value)
        elif line.startswith("governor_engine_metrics_age_seconds{"):
            age = max(age, float(value))
        elif line.startswith("vllm:num_requests_running{"):
            own += float(value)
    return engine, asked - age, own


@pytest.mark.parametrize("preset", ["balanced", "off"])  # streamed upstream (loop checks) / vLLM's own JSON answer
def test_non_streaming_disconnect_aborts_within_2s(live: Live, preset: str) -> None:
    body = {"model": live.model, "prompt": [f"Count from {i}:" for i in range(32)], "n": 4, "max_tokens": 1000,
            "ignore_eos": True, "decoding_preset": preset}  # fmt: skip
    raw = orjson.dumps(body)
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))  # fmt: skip
        wait_for(lambda: running(live)[0] >= 1, 30, what="the batch to run in vLLM")
        left = time.monotonic()
    # The client is gone. Wait for a reading of the engine taken no later than 2 s after the hang-up that
    # shows nothing running (readings are up to ~1 s old, so this waits up to 4 s for one).
    seen: list[str] = []

    def stopped() -> bool:
        engine, at, own = running(live)
        seen.append(f"{at - left:+.2f} s: engine {engine:.0f}, governor {own:.0f}")
        assert not (engine > 0 and at - left > 2.0), f"vLLM still running the batch: {seen}"
        return engine == 0 and own == 0 and at - left <= 2.0

    wait_for(stopped, 4, interval=0.1, what="vLLM to abort the disconnected request")


def test_batch_beyond_the_sequence_cap_is_refused(live: Live) -> None:
    prompts = [f"Item {i}:" for i in range(1024)]
    r = httpx.post(live.v1 + "/completions", json={"model": live.model, "prompt": prompts, "max_tokens": 2}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "too_many_sequences" and "1024" in error["message"]
    under = {"model": live.model, "prompt": prompts[:64], "n": 2, "max_tokens": 2}  # 128 sequences
    r = httpx.post(live.v1 + "/completions", json=under, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 128
