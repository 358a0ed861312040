"""What the token quota relies on, against the real engine (issue 28, finding 1): a stream cut before its
usage event is charged one token per event it relayed, so vLLM must stream one token an event; checked
here on the gateway's own relay, preset `off` (usage only in the last event), chat and completions."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.conftest import Live

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_relayed_events_count_the_tokens_generated(live: Live, endpoint: str) -> None:
    body: dict[str, object] = {"model": live.model, "max_tokens": 200, "ignore_eos": True, "stream": True,
                               "decoding_preset": "off", "stream_options": {"include_usage": True}}  # fmt: skip
    if endpoint == "completions":
        body["prompt"] = "Write a long story about a lighthouse keeper:"
    else:
        body["messages"] = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    events, usage = 0, None
    with httpx.stream("POST", f"{live.v1}/{endpoint}", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if chunk.get("choices"):
                events += 1
            if chunk.get("usage"):
                usage = chunk["usage"]
    assert usage is not None and usage["completion_tokens"] == 200
    # the charge of a stream cut at any point is >= 0.9 x what it generated (role and finish chunks add a few)
    assert 0.9 * usage["completion_tokens"] <= events <= usage["completion_tokens"] + 2, (events, usage)
