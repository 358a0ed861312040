"""The locustfile's helper (loadtests/openai_traffic.py): bodies, SSE measurement, weights. No locust import."""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

HELPER = Path(__file__).resolve().parents[2] / "loadtests" / "openai_traffic.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("openai_traffic", HELPER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("openai_traffic", module)  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


traffic = _load()


def _events(*objs: object, done: bool = True) -> list[bytes]:
    lines = []
    for obj in objs:
        lines += [b"data: " + json.dumps(obj).encode() + b"\n", b"\n"]
    if done:
        lines += [b"data: [DONE]\n", b"\n"]
    return lines


def _chunk(text: str) -> dict[str, object]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


ROLE = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}


def _clock(*times: float):  # type: ignore[no-untyped-def]
    values = iter(times)
    return lambda: next(values)


def test_stream_ttft_tpot_and_usage_tokens() -> None:
    # The role chunk carries no output; 3 output events at t=1.1, 1.2, 1.5; usage says 5 tokens; end at 1.6.
    lines = _events(ROLE, _chunk("a"), _chunk("b"), _chunk("c d e"), USAGE)
    out = traffic.measure_stream(lines, start=1.0, clock=_clock(1.1, 1.2, 1.5, 1.6))
    assert out.error is None and out.tokens == 5
    assert out.ttft_ms == pytest.approx(100)
    assert out.tpot_ms == pytest.approx(400 / 4)
    assert out.total_ms == pytest.approx(600)
    assert out.tokens_per_second == pytest.approx(5 / 0.6)
    assert out.nbytes == sum(len(line) for line in lines)


def test_completions_text_counts_as_output_and_no_usage_falls_back_to_events() -> None:
    text = {"object": "text_completion", "choices": [{"index": 0, "text": " hi"}]}
    out = traffic.measure_stream(_events(text, text), start=0.0, clock=_clock(0.01, 0.02, 0.05))
    assert out.error is None and out.tokens == 2 and out.tpot_ms == pytest.approx(10)


def test_stream_without_done_or_with_error_event_fails() -> None:
    out = traffic.measure_stream(_events(_chunk("a"), done=False), start=0.0, clock=itertools.count().__next__)
    assert out.error == "stream ended without [DONE]"
    err = {"error": {"message": "Loop detected upstream died", "type": "server_error", "code": 500}}
    out = traffic.measure_stream(_events(_chunk("a"), err), start=0.0, clock=itertools.count().__next__)
    assert out.error == "error event: Loop detected upstream died"
    out = traffic.measure_stream([b"data: {nope\n"], start=0.0, clock=itertools.count().__next__)
    assert out.error is not None and out.error.startswith("unparsable event")


def test_one_token_has_ttft_but_no_tpot() -> None:
    usage = {"choices": [], "usage": {"completion_tokens": 1}}
    out = traffic.measure_stream(_events(_chunk("a"), usage), start=0.0, clock=_clock(0.2, 0.3))
    assert out.ttft_ms == pytest.approx(200) and out.tpot_ms is None and out.tokens == 1


def test_plain_body() -> None:
    ok = {"choices": [{"message": {"content": "x"}}], "usage": {"completion_tokens": 7}}
    out = traffic.measure_body(json.dumps(ok).encode(), start=0.0, clock=lambda: 0.5)
    assert out.error is None and out.tokens == 7 and out.tokens_per_second == pytest.approx(14)
    bad = traffic.measure_body(b'{"error": {"message": "no"}}', start=0.0, clock=lambda: 0.1)
    assert bad.error == "error body: no"


def test_bodies_send_governor_fields_only_to_governor() -> None:
    gov = traffic.TrafficConfig(model="m", max_tokens=9)
    body = traffic.chat_body(gov, "m", "hi", True, temperature=0, decoding_preset="balanced")
    assert body == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "stream": True,
        "stream_options": {"include_usage": True}, "decoding_preset": "balanced", "temperature": 0,
    }  # fmt: skip
    plain = traffic.TrafficConfig(model="m", max_tokens=9, governor=False)
    body = traffic.completion_body(plain, "m", "hi", False, decoding_preset="balanced")
    assert body == {"model": "m", "prompt": "hi", "max_tokens": 9, "stream": False}


def test_headers_weights_models_and_long_prompt() -> None:
    assert traffic.TrafficConfig(api_key="k").headers()["Authorization"] == "Bearer k"
    assert "Authorization" not in traffic.TrafficConfig().headers()
    assert traffic.parse_weights("a:3, b:1,c") == [("a", 3.0), ("b", 1.0), ("c", 1.0)]
    assert traffic.parse_weights("") == []
    with pytest.raises(ValueError):
        traffic.parse_weights("a:0")
    listing = {"data": [{"id": "base", "parent": None}, {"id": "ad1", "parent": "base"}]}
    assert traffic.split_models(listing) == ("base", ["ad1"])
    with pytest.raises(ValueError):
        traffic.split_models({"data": []})
    words = len(traffic.long_prompt(random.Random(1), 1500).split())
    assert 1100 <= words <= 1200  # ~1.5k tokens at ~0.75 words per token
    assert traffic.parse_bool("1") and traffic.parse_bool("true") and not traffic.parse_bool("0")
