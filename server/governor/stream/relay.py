"""Relays an upstream vLLM SSE stream to the client, cutting loops on the way.

Fast path (no loop detection): bytes are forwarded as they come, only the final usage event is parsed.
Loop path: every event is parsed, text deltas go to one LoopDetector per choice, a looping choice ends with
finish_reason "stop" / stop_reason "loop_detected"; once all have, the upstream request is closed (vLLM aborts it).
Whatever fails on the way (vLLM's in-stream error event, an unreadable event, the engine going away, a
bug) ends the response with an error: an error event and [DONE] when streaming, a raised GovernorError
from collect(); each is logged with the request id and counted by reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from governor.engine.base import Upstream
from governor.errors import DeadlineExceeded, EngineUnavailable, GovernorError
from governor.stream.assemble import Assembler
from governor.stream.loop_detector import LoopConfig, LoopDetector
from governor.stream.loop_trim import trim_to_first_copy
from governor.stream.sse import (
    DONE,
    ERROR_KEY,
    NEXT_EVENT,
    SEP,
    TEXT_PATTERNS,
    USAGE_FIELD_PATTERN,
    EventSplitter,
    done_at,
    error_event,
    event,
    event_error,
    event_start,
    payloads,
    plain_prefix,
    raw_event,
    tail_error,
)

log = logging.getLogger("governor.stream")

LOOP_REASON = "loop_detected"
_END_WAIT_SECONDS = 0.25  # for the end of a response after its [DONE]
_VLLM_REPETITION = b"repetition_detected"
_USAGE = b'"usage":{'
_USAGE_FIELD = b',"usage":{'
_OBJECT_END = b"}}" + SEP
# Why a stream failed, the `reason` label of governor_stream_errors_total (a fixed set: bounded).
REASONS = ("upstream_error", "engine_unavailable", "deadline", "bad_event", "internal")


@dataclass
class RelayStats:
    """What the relay saw; read by metrics once the request ends."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_seen: bool = False  # the engine reported usage (exact); else only `events` says what was generated
    events: int = 0  # upstream events received: one token each in vLLM's stream (default --stream-interval 1)
    first_token_at: float | None = None
    loops_cut: int = 0
    outcome: str = "ok"  # ok | loop | error | deadline | disconnect
    error: str | None = None  # one of REASONS when the stream failed


class Relay:
    """One upstream response on its way to one client."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        kind: str,
        n: int,
        loop: LoopConfig | None,
        client_usage: bool,
        client_continuous: bool,
        request_id: str = "-",
        on_error: Callable[[str], None] | None = None,
        on_first_token: Callable[[], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.request_id = request_id
        self.on_error = on_error  # counts a failure by reason (governor_stream_errors_total)
        self.on_first_token = on_first_token  # waiting → running in the model-server series
        self.kind = kind
        self.n = max(1, n)
        self.loop = loop
        self.client_usage = client_usage
        self.client_continuous = client_continuous
        self.stats = RelayStats()
        self._detectors: dict[int, LoopDetector] = {}
        self._finished: set[int] = set()
        self._cut_choices: set[int] = set()
        self._head: dict[str, Any] = {}
        self._texts = TEXT_PATTERNS["chat" if kind == "chat" else "completions"]

    # -- upstream events -------------------------------------------------------------------------------

    async def _blocks(self) -> AsyncIterator[tuple[bytes, int]]:
        """Upstream events, one block (`data: …\\n\\n` each) per network read, until [DONE], with the
        number of events in it; a stream that ends without [DONE] is an error. Working per read (many
        events under load) on whole blocks with C-speed bytes operations keeps the per-event cost near zero."""
        splitter = EventSplitter()
        chunks = self.upstream.chunks()
        try:
            async for chunk in chunks:
                if self.stats.first_token_at is None:
                    self.stats.first_token_at = time.monotonic()
                    if self.on_first_token is not None:
                        self.on_first_token()
                block = splitter.feed_block(chunk)
                if not block:
                    continue
                count = splitter.events
                end = done_at(block)
                events = block if end < 0 else block[:end]
                if end >= 0:
                    count -= 1 + block.count(NEXT_EVENT, end)  # [DONE] and whatever came after it
                self.stats.events += count
                # vLLM's error event `{"error": {...}}` comes last: a block that ends like it gets one look at its
                # last event, never a scan of the whole block (chunks without usage end in `]}`: no look at all)
                if events.endswith(_OBJECT_END) and events.find(ERROR_KEY, events.rfind(SEP, 0, -2) + 1) >= 0:
                    events, error = tail_error(events)
                    if error is not None:
                        if events:
                            yield events, count - 1  # the events before the error still reach the client
                        self.stats.error = "upstream_error"
                        raise error
                if end >= 0:
                    if events:
                        yield events, count
                    await _read_to_end(chunks)
                    return
                yield block, count
        except TimeoutError as exc:
            raise DeadlineExceeded("Request deadline exceeded; generation was stopped.") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise EngineUnavailable("The engine stopped while generating; the response is incomplete.") from exc
        raise EngineUnavailable("The engine closed the stream early; the response is incomplete.")

    def _note_usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self.stats.usage_seen = True
            self.stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.stats.completion_tokens = int(usage.get("completion_tokens") or 0)

    def _raise_if_error(self, obj: dict[str, Any]) -> None:
        """An error event anywhere else in a stream, among the events that are parsed anyway."""
        if "error" in obj and (error := event_error(obj)) is not None:
            self.stats.error = "upstream_error"
            raise error

    def _detector(self, index: int) -> LoopDetector:
        det = self._detectors.get(index)
        if det is None:
            assert self.loop is not None
            det = self._detectors[index] = LoopDetector(self.loop)
        return det

    def _drop_cut(self, obj: dict[str, Any]) -> None:
        """With n > 1 the other choices go on upstream; a cut choice must not grow further."""
        if self._cut_choices and obj.get("choices"):
            obj["choices"] = [c for c in obj["choices"] if int(c.get("index", 0)) not in self._cut_choices]

    def _scan(self, obj: dict[str, Any]) -> list[int]:
        """Feed text deltas to the detectors; return the choices that just started looping."""
        looping = []
        for ch in obj.get("choices") or ():
            index = int(ch.get("index", 0))
            if ch.get("stop_reason") == "repetition_detected":
                ch["stop_reason"] = LOOP_REASON  # vLLM's own n-gram stop reads the same to clients
                self.stats.loops_cut += 1
            if ch.get("finish_reason") is not None:
                self._finished.add(index)
                continue
            if self.loop is None or index in self._finished:
                continue
            delta = ch.get("delta")
            text = (delta.get("content") if delta else None) if self.kind == "chat" else ch.get("text")
            if text and self._detector(index).feed(text) is not None:
                looping.append(index)
        return looping

    def _cut(self, index: int, head: dict[str, Any]) -> dict[str, Any]:
        """The chunk that finishes a looping choice."""
        self._finished.add(index)
        self._cut_choices.add(index)
        self.stats.loops_cut += 1
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": "stop", "stop_reason": LOOP_REASON}
        if self.kind == "chat":
            choice["delta"] = {}
        else:
            choice["text"] = ""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": head.get("id"), "object": obj, "created": head.get("created"), "model": head.get("model"),
                "choices": [choice]}  # fmt: skip

    def _usage_chunk(self, head: dict[str, Any]) -> dict[str, Any]:
        s = self.stats
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                 "total_tokens": s.prompt_tokens + s.completion_tokens}  # fmt: skip
        return {"id": head.get("id"), "object": obj, "created": head.get("created"), "model": head.get("model"),
                "choices": [], "usage": usage}  # fmt: skip

    # -- streaming clients -----------------------------------------------------------------------------

    async def stream(self) -> AsyncIterator[bytes]:
        """SSE bytes for the client; errors become an error event followed by [DONE]."""
        try:
            if self.loop is None:
                async for out in self._stream_fast():
                    yield out
            else:
                async for out in self._stream_checked():
                    yield out
        except Exception as exc:  # whatever fails, the client gets an error event and [DONE], never silence
            yield error_event(self._failed(exc)) + DONE
        finally:
            self.upstream.abort()

    def _failed(self, exc: Exception) -> GovernorError:
        """Record, log and count a failure; the error the client sees."""
        if isinstance(exc, GovernorError):
            error = exc
            reason = self.stats.error or ("deadline" if isinstance(exc, DeadlineExceeded) else "engine_unavailable")
        else:
            # an upstream event Governor cannot read (or a bug of its own): the answer is incomplete either way
            if isinstance(exc, orjson.JSONDecodeError):
                reason, code, what = "bad_event", "bad_upstream_event", "The engine sent an unreadable event"
            else:
                reason, code, what = "internal", "internal_error", "Internal error while relaying (see the server log)"
            error = EngineUnavailable(f"{what}; the response is incomplete.", code=code)
        self.stats.outcome = "deadline" if reason == "deadline" else "error"
        self.stats.error = reason
        if self.on_error is not None:
            self.on_error(reason)
        log.warning(
            "stream failed: %s", error.message, exc_info=not isinstance(exc, GovernorError),
            extra={"request_id": self.request_id, "reason": reason, "status": error.status},
        )  # fmt: skip
        return error

    async def _payloads(self) -> AsyncIterator[bytes]:
        async for block, _ in self._blocks():
            for payload in payloads(block):
                yield payload

    async def _stream_fast(self) -> AsyncIterator[bytes]:
        async for block, _ in self._blocks():
            cut = event_start(block, _USAGE, _VLLM_REPETITION)
            if cut == len(block):
                yield block  # a byte relay
                continue
            out = [block[:cut]]
            for payload in payloads(block[cut:]):
                if _USAGE in payload or _VLLM_REPETITION in payload:
                    obj = orjson.loads(payload)
                    self._note_usage(obj.get("usage"))
                    if _VLLM_REPETITION in payload:
                        self._scan(obj)
                        payload = orjson.dumps(obj)
                    if not obj.get("choices") and not self.client_usage:
                        continue  # the usage-only chunk Governor asked for on its own behalf
                out.append(raw_event(payload))
            if out:
                yield b"".join(out)
        yield DONE

    async def _stream_checked(self) -> AsyncIterator[bytes]:
        async for block, count in self._blocks():
            out, looping = self._checked_block(block, count) if self.n == 1 else self._parsed_block(block)
            for index in looping:
                out.append(event(self._cut(index, self._head)))
            if looping and len(self._finished) >= self.n:
                self.stats.outcome = "loop"
                if self.client_usage:
                    out.append(event(self._usage_chunk(self._head)))
                yield b"".join(out)
                break
            if out:
                yield b"".join(out)
        yield DONE

    def _checked_block(self, block: bytes, count: int) -> tuple[list[bytes], list[int]]:
        """One choice: runs of plain events in bulk, the others (first, last, usage) one by one; ``count``
        events in the block."""
        out: list[bytes] = []
        while block:
            cut, plain = plain_prefix(block, count) if self._head else (0, 0)
            if cut:
                sent, text = self._plain_block(block if cut == len(block) else block[:cut])
                out.append(sent)
                if text and self._detector(0).feed(text) is not None:
                    return out, [0]
            else:
                cut, plain = block.find(SEP) + 2, 1
                events, looping = self._parsed_block(block[:cut])
                out += events
                if looping:
                    return out, looping
            block = block[cut:]
            count -= plain
        return out, []

    def _plain_block(self, block: bytes) -> tuple[bytes, str]:
        """Plain events (one choice, mid-generation) on bytes: (block to send, its text)."""
        at = block.rfind(_USAGE_FIELD)
        last = USAGE_FIELD_PATTERN.match(block, at) if at >= 0 else None
        if last is not None:  # Governor's continuous usage: note the latest, strip it unless the client asked
            self._note_usage(orjson.loads(last[0][len(_USAGE_FIELD) - 1 :]))
            if not self.client_continuous:
                block = USAGE_FIELD_PATTERN.sub(b"", block)
        raw = b"".join(self._texts.findall(block))
        if b"\\" not in raw:
            return block, raw.decode("utf-8", "replace")
        try:
            return block, orjson.loads(b'"' + raw + b'"')
        except orjson.JSONDecodeError:  # a lone surrogate escape: the stdlib decodes it anyway
            return block, json.loads(b'"' + raw + b'"')

    def _parsed_block(self, block: bytes) -> tuple[list[bytes], list[int]]:
        """Any other block, event by event: (events to send, choices that just started looping)."""
        out: list[bytes] = []
        for payload in payloads(block):
            obj = orjson.loads(payload)
            self._raise_if_error(obj)
            if not self._head:
                self._head = {k: obj.get(k) for k in ("id", "created", "model")}
            self._note_usage(obj.get("usage"))
            usage_only = not obj.get("choices")
            self._drop_cut(obj)
            if usage_only and not self.client_usage:
                continue
            if not usage_only and not obj["choices"]:
                continue  # only deltas of choices already cut
            looping = self._scan(obj)
            if "usage" in obj and not usage_only and not self.client_continuous:
                del obj["usage"]  # continuous usage was Governor's request, not the client's
            out.append(event(obj))
            if looping:
                return out, looping
        return out, []

    # -- non-streaming clients -------------------------------------------------------------------------

    async def collect(self) -> dict[str, Any]:
        """Consume the whole stream and return the ordinary non-streaming body."""
        assembler = Assembler(self.kind)
        try:
            async for payload in self._payloads():
                obj = orjson.loads(payload)
                self._raise_if_error(obj)
                self._note_usage(obj.get("usage"))
                self._drop_cut(obj)
                looping = self._scan(obj)
                assembler.add(obj)
                for index in looping:
                    self._finished.add(index)
                    self._cut_choices.add(index)
                    self.stats.loops_cut += 1
                    parts = assembler.choice(index)
                    parts.text = [trim_to_first_copy("".join(parts.text), self.loop or LoopConfig())]
                    parts.finish_reason, parts.stop_reason = "stop", LOOP_REASON
                if looping and len(self._finished) >= self.n:
                    self.stats.outcome = "loop"
                    break
        except Exception as exc:
            error = self._failed(exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            self.upstream.abort()
        if assembler.usage is None or self.stats.outcome == "loop":
            # usage still reports every token generated, including the trimmed ones
            s = self.stats
            assembler.usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                               "total_tokens": s.prompt_tokens + s.completion_tokens}  # fmt: skip
        return assembler.result()


async def _read_to_end(chunks: AsyncIterator[bytes]) -> None:
    """After [DONE], the rest of the response (the chunked-encoding terminator, sent right after it):
    read to its end, the upstream's connection goes back to the pool instead of being closed, which
    saves a TCP connect (and a TIME_WAIT socket) per request."""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
        async with asyncio.timeout(_END_WAIT_SECONDS):
            async for _ in chunks:
                pass
