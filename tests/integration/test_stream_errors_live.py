"""vLLM's own in-stream error reaches the client under every preset (real engine, session `live` fixture).

vLLM checks some parameters only when the engine takes the request, inside the response generator,
after its HTTP 200 went out: an out-of-vocabulary `stop_token_ids` entry is one (SamplingParams.verify
in the input processor). A streaming request then gets `data: {"error": {...}}` and [DONE]; Governor
streams non-streaming requests upstream under `balanced`, so without care that error was dropped and
the client got a 200 with empty text.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import Live

pytestmark = pytest.mark.engine
OUT_OF_VOCAB = 10_000_000  # SmolLM2's vocabulary has 49,152 tokens


def body(live: Live, preset: str, stream: bool) -> dict[str, Any]:
    return {"model": live.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
            "stop_token_ids": [OUT_OF_VOCAB], "decoding_preset": preset, "stream": stream}  # fmt: skip


def upstream_errors(live: Live) -> float:
    for line in httpx.get(live.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('governor_stream_errors_total{reason="upstream_error"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("preset", ["off", "balanced"])
def test_vllm_in_stream_error_reaches_streaming_client(live: Live, preset: str) -> None:
    before = upstream_errors(live)
    rid = f"in-stream-error-{preset}"
    r = httpx.post(live.v1 + "/chat/completions", json=body(live, preset, True), headers={"X-Request-Id": rid},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text  # vLLM had accepted the request: the error came inside the stream
    events = [part[6:] for part in r.text.split("\n\n") if part.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert str(OUT_OF_VOCAB) in error["message"] and error["param"] == "stop_token_ids"
    assert error["type"] == "invalid_request_error"
    assert upstream_errors(live) == before + 1
    assert any("stream failed" in line and f"request_id={rid}" in line for line in live.log_tail(400).splitlines())


@pytest.mark.parametrize("preset", ["off", "balanced"])
def test_vllm_error_is_an_error_response_not_200(live: Live, preset: str) -> None:
    r = httpx.post(live.v1 + "/chat/completions", json=body(live, preset, False), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert str(OUT_OF_VOCAB) in error["message"] and error["param"] == "stop_token_ids"
    ok = httpx.post(live.v1 + "/chat/completions", json={**body(live, preset, False), "stop_token_ids": [2]},
                    timeout=60)  # fmt: skip
    assert ok.status_code == 200, ok.text  # the engine is fine and serves the next request
