"""Relay unit tests over an in-memory upstream: pass-through, usage handling, loop cuts, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from governor.errors import EngineUnavailable
from governor.stream.loop_detector import LoopConfig
from governor.stream.relay import Relay
from governor.stream.sse import EventSplitter


class MemoryUpstream:
    def __init__(self, chunks: list[bytes]) -> None:
        self.status = 200
        self._chunks = chunks
        self.aborted = False
        self.served = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            if self.aborted:
                return
            self.served += 1
            yield chunk

    async def read(self) -> bytes:
        return b"".join(self._chunks)

    def abort(self) -> None:
        self.aborted = True


def chat_events(texts: list[str], finish: str = "length", usage_each: bool = False, done: bool = True) -> list[bytes]:
    out = []
    for i, text in enumerate(texts):
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish if i == len(texts) - 1 else None}
        body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                "choices": [choice]}  # fmt: skip
        if usage_each:
            body["usage"] = {"prompt_tokens": 3, "completion_tokens": i + 1, "total_tokens": 4 + i}
        out.append(b"data: " + orjson.dumps(body) + b"\n\n")
    usage = {"prompt_tokens": 3, "completion_tokens": len(texts), "total_tokens": 3 + len(texts)}
    out.append(b"data: " + orjson.dumps({"id": "c1", "choices": [], "usage": usage}) + b"\n\n")
    if done:
        out.append(b"data: [DONE]\n\n")
    return out


async def drain(relay: Relay) -> list[Any]:
    splitter = EventSplitter()
    events = []
    async for chunk in relay.stream():
        for payload in splitter.feed(chunk):
            events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return events


# Token-sized deltas, as vLLM streams them.
LOOP = [w + " " for w in ("The sea is calm tonight and the stars are bright. " * 12).split()]
PROSE = [f"Sentence number {w} talks about a different {w} topic entirely. " for w in
         ("red", "blue", "green", "stone", "river", "cloud")]  # fmt: skip


async def test_fast_path_passes_bytes_and_hides_unrequested_usage() -> None:
    up = MemoryUpstream(chat_events(["Hel", "lo"]))
    relay = Relay(up, kind="chat", n=1, loop=None, client_usage=False, client_continuous=False)
    events = await drain(relay)
    assert events[-1] == "[DONE]"
    assert all(e == "[DONE]" or e["choices"] for e in events)  # the usage-only chunk was Governor's
    assert relay.stats.completion_tokens == 2 and relay.stats.prompt_tokens == 3


async def test_a_stream_cut_before_its_usage_counts_the_events_it_relayed() -> None:
    # preset off: usage comes only in the last event; a client gone before it leaves the event count
    up = MemoryUpstream(chat_events([f"w{i} " for i in range(10)]))
    relay = Relay(up, kind="chat", n=1, loop=None, client_usage=False, client_continuous=False)
    stream = relay.stream()
    for _ in range(6):
        await anext(stream)
    await stream.aclose()
    assert up.aborted and relay.stats.events == 6 and not relay.stats.usage_seen
    whole = Relay(MemoryUpstream(chat_events(["a", "b"])), kind="chat", n=1, loop=None, client_usage=False,
                  client_continuous=False)  # fmt: skip
    await drain(whole)
    assert whole.stats.usage_seen and whole.stats.completion_tokens == 2


async def test_fast_path_keeps_requested_usage() -> None:
    relay = Relay(MemoryUpstream(chat_events(["a", "b"])), kind="chat", n=1, loop=None, client_usage=True,
                  client_continuous=False)  # fmt: skip
    events = await drain(relay)
    assert events[-2]["usage"]["completion_tokens"] == 2


async def test_loop_is_cut_with_stop_reason_and_upstream_aborted() -> None:
    up = MemoryUpstream(chat_events(LOOP, usage_each=True))
    relay = Relay(up, kind="chat", n=1, loop=LoopConfig(), client_usage=True, client_continuous=False)
    events = await drain(relay)
    finals = [e for e in events if e != "[DONE]" and e["choices"] and e["choices"][0].get("finish_reason")]
    assert finals[-1]["choices"][0]["finish_reason"] == "stop"
    assert finals[-1]["choices"][0]["stop_reason"] == "loop_detected"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e != "[DONE]" and e["choices"])
    assert text.count("The sea is calm tonight and the stars are bright.") == 2  # a reader sees at most two copies
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] >= 1  # usage still reported after the cut
    assert up.aborted and up.served < len(LOOP)
    assert relay.stats.loops_cut == 1 and relay.stats.outcome == "loop"
    # continuous usage was Governor's request only: content chunks carry none
    assert all("usage" not in e for e in events[:-2] if e != "[DONE]")


async def test_varied_text_is_not_cut() -> None:
    relay = Relay(MemoryUpstream(chat_events(PROSE, usage_each=True)), kind="chat", n=1, loop=LoopConfig(),
                  client_usage=False, client_continuous=False)  # fmt: skip
    events = await drain(relay)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert relay.stats.loops_cut == 0


async def test_collect_trims_to_first_copy_and_counts_all_tokens() -> None:
    up = MemoryUpstream(chat_events(LOOP, usage_each=True))
    relay = Relay(up, kind="chat", n=1, loop=LoopConfig(), client_usage=False, client_continuous=False)
    body = await relay.collect()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == "loop_detected"
    assert choice["message"]["content"].count("The sea is calm tonight") == 1
    assert body["usage"]["completion_tokens"] > 1


async def test_truncated_stream_is_an_error_event() -> None:
    up = MemoryUpstream(chat_events(["a", "b"], done=False)[:-1])
    relay = Relay(up, kind="chat", n=1, loop=None, client_usage=False, client_continuous=False)
    events = await drain(relay)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_unavailable"
    assert relay.stats.outcome == "error"


async def test_truncated_stream_raises_for_non_streaming() -> None:
    up = MemoryUpstream(chat_events(["a"], done=False)[:-1])
    relay = Relay(up, kind="chat", n=1, loop=LoopConfig(), client_usage=False, client_continuous=False)
    with pytest.raises(EngineUnavailable):
        await relay.collect()


async def test_vllm_repetition_detected_reads_as_loop_detected() -> None:
    body = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop",
                                     "stop_reason": "repetition_detected"}]}  # fmt: skip
    up = MemoryUpstream([b"data: " + orjson.dumps(body) + b"\n\n", b"data: [DONE]\n\n"])
    relay = Relay(up, kind="chat", n=1, loop=None, client_usage=False, client_continuous=False)
    events = await drain(relay)
    assert events[0]["choices"][0]["stop_reason"] == "loop_detected"
    assert relay.stats.loops_cut == 1


def test_splitter_handles_split_events() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a"') == []
    assert splitter.feed(b":1}\n\ndata: [DONE]\n\n") == [b'{"a":1}', b"[DONE]"]


async def test_escaped_text_is_decoded_for_the_detector_and_sent_unchanged() -> None:
    sentence = 'She said "the tide is high" and walked on.\n'
    tokens = [w + " " for w in (sentence * 6).split(" ") if w]
    up = MemoryUpstream(chat_events(tokens, usage_each=True))
    relay = Relay(up, kind="chat", n=1, loop=LoopConfig(), client_usage=False, client_continuous=False)
    events = await drain(relay)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e != "[DONE]" and e["choices"])
    assert 'said "the tide is high"' in text  # escapes survive the relay byte for byte
    assert events[-2]["choices"][0]["stop_reason"] == "loop_detected"


async def test_continuous_usage_kept_when_the_client_asked() -> None:
    relay = Relay(MemoryUpstream(chat_events(PROSE, usage_each=True)), kind="chat", n=1, loop=LoopConfig(),
                  client_usage=True, client_continuous=True)  # fmt: skip
    events = await drain(relay)
    assert all("usage" in e for e in events[:-1])


async def test_tricky_deltas_and_nested_usage_survive_the_byte_path() -> None:
    # tokens ending in a backslash or a quote, escapes, non-ASCII; usage with a nested details object
    sentence = ["Path C:", "\\", "temp", '\\"', ' is "odd', '"', " — é ", "\u2028", "ok.\n"]
    tokens = sentence * 6
    events = []
    for i, text in enumerate(tokens):
        usage = {"prompt_tokens": 3, "completion_tokens": i + 1, "total_tokens": 4 + i,
                 "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice],
                "usage": usage}  # fmt: skip
        events.append(b"data: " + orjson.dumps(body) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    relay = Relay(MemoryUpstream(events), kind="chat", n=1, loop=LoopConfig(), client_usage=False,
                  client_continuous=False)  # fmt: skip
    out = await drain(relay)
    content = [e["choices"][0]["delta"].get("content", "") for e in out if e != "[DONE]" and e["choices"]]
    assert content[: len(sentence) * 2] == sentence * 2  # byte-exact, escapes and all
    assert not any("usage" in e for e in out if e != "[DONE]")  # Governor's continuous usage is stripped
    assert out[-2]["choices"][0]["stop_reason"] == "loop_detected"  # the detector saw the decoded text
    assert relay.stats.prompt_tokens == 3 and 2 * len(sentence) < relay.stats.completion_tokens < len(tokens)


def completion_events(texts: list[str], usage_each: bool) -> list[bytes]:
    """The completions shape of chat_events."""
    out = []
    for event in chat_events(texts, usage_each=usage_each):
        if event.startswith(b"data: {"):
            body = orjson.loads(event[6:])
            for choice in body["choices"]:
                choice["text"] = choice.pop("delta")["content"]
            event = b"data: " + orjson.dumps(body) + b"\n\n"
        out.append(event)
    return out


def rechunk(events: list[bytes], how: str) -> list[bytes]:
    """The same bytes as one event per read, all in one read, or 7-byte reads (events split anywhere)."""
    data = b"".join(events)
    if how == "events":
        return events
    if how == "whole":
        return [data]
    return [data[i : i + 7] for i in range(0, len(data), 7)]


@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize("loop", [None, LoopConfig()])
@pytest.mark.parametrize(("client_usage", "client_continuous"), [(False, False), (True, False), (True, True)])
async def test_output_does_not_depend_on_how_reads_split_the_stream(
    kind: str, loop: LoopConfig | None, client_usage: bool, client_continuous: bool
) -> None:
    each = loop is not None or client_continuous  # when Governor asks vLLM for continuous usage
    events = chat_events(PROSE, usage_each=each) if kind == "chat" else completion_events(PROSE, usage_each=each)
    results = []
    for how in ("events", "whole", "bytes"):
        relay = Relay(MemoryUpstream(rechunk(events, how)), kind=kind, n=1, loop=loop, client_usage=client_usage,
                      client_continuous=client_continuous)  # fmt: skip
        results.append((await drain(relay), relay.stats.completion_tokens))
    assert results[0] == results[1] == results[2]
    out, tokens = results[0]
    assert tokens == len(PROSE) and out[-1] == "[DONE]"
    assert any("usage" in e for e in out[:-1]) == client_usage
    assert all("usage" in e for e in out[:-1]) == client_continuous


@pytest.mark.parametrize("how", ["events", "whole", "bytes"])
async def test_loop_is_cut_however_reads_split_the_stream(how: str) -> None:
    up = MemoryUpstream(rechunk(chat_events(LOOP, usage_each=True), how))
    relay = Relay(up, kind="chat", n=1, loop=LoopConfig(), client_usage=True, client_continuous=False)
    events = await drain(relay)
    assert events[-3]["choices"][0]["stop_reason"] == "loop_detected"
    assert events[-2]["usage"]["completion_tokens"] == relay.stats.completion_tokens > 0
    assert relay.stats.outcome == "loop" and events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-2])


@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize("client_usage", [False, True])
async def test_events_that_are_not_plain_anywhere_in_a_read_are_handled_one_by_one(
    kind: str, client_usage: bool
) -> None:
    # usage-only chunks mid-stream and a finish reason before the end: a read holding them is cut into
    # runs of plain events around them, whichever the read
    events = chat_events(PROSE, usage_each=True) if kind == "chat" else completion_events(PROSE, usage_each=True)
    body = orjson.loads(events[2][6:])
    body["choices"] = []
    usage_only = b"data: " + orjson.dumps(body) + b"\n\n"
    body = orjson.loads(events[3][6:])
    body["choices"][0]["finish_reason"] = "stop"
    finished = b"data: " + orjson.dumps({**body, "choices": [{**body["choices"][0], "index": 0}]}) + b"\n\n"
    events = [*events[:2], usage_only, *events[2:4], usage_only, usage_only, finished, *events[4:]]
    results = []
    for how in ("events", "whole", "bytes"):
        relay = Relay(MemoryUpstream(rechunk(events, how)), kind=kind, n=1, loop=LoopConfig(),
                      client_usage=client_usage, client_continuous=False)  # fmt: skip
        results.append(await drain(relay))
    assert results[0] == results[1] == results[2]
    assert sum(1 for e in results[0] if e != "[DONE]" and not e["choices"]) == (4 if client_usage else 0)
