"""Server-sent events: splitting upstream bytes into events and formatting our own."""

from __future__ import annotations

import re
from typing import Any

import orjson

from governor.errors import EngineUnavailable, GovernorError, error_body, from_status
from governor.redaction import redact_paths

DONE = b"data: [DONE]\n\n"
SEP = b"\n\n"  # ends every event
NEXT_EVENT = b"\n\ndata: "


class EventSplitter:
    """Turns arbitrary byte chunks into complete SSE events."""

    __slots__ = ("_buf", "events")

    def __init__(self) -> None:
        self._buf = b""
        self.events = 0  # events in the block feed_block returned last

    def feed_block(self, chunk: bytes) -> bytes:
        """The events completed by ``chunk``, as one block in vLLM's shape: `data: <payload>\n\n` each.
        A JSON payload holds no raw newline, so counting newlines proves the shape without a split: each
        `\n\ndata: ` holds two and the final `\n\n` two more; any other newline breaks the equality."""
        buf = self._buf + chunk if self._buf else chunk
        cut = buf.rfind(SEP)
        if cut < 0:
            self._buf = buf
            self.events = 0
            return b""
        block, self._buf = buf[: cut + 2], buf[cut + 2 :]
        nexts = block.count(NEXT_EVENT)
        if block[:6] == b"data: " and block.count(b"\n") == 2 * nexts + 2:
            self.events = nexts + 1
            return block
        # tolerate CRLF, `data:` without the space, several lines and comment lines anyway
        out = []
        for part in block.split(SEP)[:-1]:
            for line in part.split(b"\n"):
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    out.append(raw_event(line[6:] if line[5:6] == b" " else line[5:]))
        self.events = len(out)
        return b"".join(out)

    def feed(self, chunk: bytes) -> list[bytes]:
        """The `data:` payloads (without the prefix) completed by ``chunk``."""
        return payloads(self.feed_block(chunk))


def payloads(block: bytes) -> list[bytes]:
    """The payloads of a block from :meth:`EventSplitter.feed_block`."""
    return [part[6:] for part in block.split(SEP)[:-1]]


def done_at(block: bytes) -> int:
    """Where the [DONE] event starts in a block, else -1 (payloads hold no raw newline: no false hit)."""
    if block.startswith(DONE):
        return 0
    at = block.find(SEP + DONE)
    return at + 2 if at >= 0 else -1


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + SEP


def raw_event(payload: bytes) -> bytes:
    return b"data: " + payload + SEP


def error_event(exc: GovernorError) -> bytes:
    """An error inside a stream: the OpenAI envelope as an event (openai-python raises APIError on it)."""
    return event(error_body(exc))


ERROR_KEY = b'"error"'  # a key or the value "error": text cannot match, its quotes are escaped


def tail_error(block: bytes) -> tuple[bytes, GovernorError | None]:
    """vLLM's in-stream error event when it ends ``block``: (the events before it, the error), else
    (block, None). vLLM sends `data: {"error": {"message", "type", "param", "code": <HTTP status>}}` when
    a request fails after its 200 went out (a parameter the engine refuses, a generation error), always
    as the last event before [DONE]; so only a block's last event is scanned, never the whole block."""
    at = block.rfind(SEP, 0, len(block) - 2)
    start = at + 2 if at >= 0 else 0
    if block.find(ERROR_KEY, start) < 0:
        return block, None
    try:
        obj = orjson.loads(block[start + 6 : -2])
    except orjson.JSONDecodeError:
        return block, None  # not an error event; whoever parses it will say what is wrong with it
    error = event_error(obj)
    return (block[:start], error) if error is not None else (block, None)


def event_error(obj: Any) -> GovernorError | None:
    """An error event (`{"error": ...}` without choices) as Governor's error: the engine's message (server
    paths out) and 4xx status kept, a 5xx as 503; else None."""
    if not isinstance(obj, dict) or "error" not in obj or "choices" in obj:
        return None
    err = obj["error"] if isinstance(obj["error"], dict) else {"message": obj["error"]}
    message = redact_paths(str(err.get("message") or "The engine reported an error.")[:2000])
    code = err.get("code")
    status = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600 else 500
    exc = from_status(status, message) if status < 500 else EngineUnavailable(f"Engine error: {message}")
    param = err.get("param")
    exc.param = param if isinstance(param, str) else None
    return exc


FINISH_NULL = b'"finish_reason":null'  # once in every event of a choice still generating


def plain_prefix(block: bytes, count: int) -> tuple[int, int]:
    """The leading run of plain events (one choice, mid-generation) in a block of ``count`` events:
    (its length in bytes, its events). A plain event holds `"finish_reason":null` once."""
    others = count - block.count(FINISH_NULL)
    if others == 0:
        return len(block), count
    if others > 0:
        # usually the last events (a finish reason, then the usage-only chunk): if the last ``others``
        # events are not plain, every event before them is
        start = len(block)
        for _ in range(others):
            end, at = start, block.rfind(SEP, 0, start - 2)
            start = at + 2 if at >= 0 else 0
            if block.find(FINISH_NULL, start, end) >= 0:
                break
        else:
            return start, count - others
    start = plain = 0
    while True:
        end = block.find(SEP, start) + 2
        if block.find(FINISH_NULL, start, end) < 0:
            return start, plain
        start, plain = end, plain + 1


def event_start(block: bytes, *markers: bytes) -> int:
    """Where the first event holding one of ``markers`` starts in a block, else the block's length."""
    found = [at for at in (block.find(marker) for marker in markers) if at >= 0]
    if not found:
        return len(block)
    at = block.rfind(SEP, 0, min(found))
    return at + 2 if at >= 0 else 0


# Patterns over whole blocks of events. A key pattern cannot match inside a JSON string (its quotes
# would be escaped there), so the first `"content":"` (chat) or `"text":"` (completions) of each
# event is its delta's text (logprobs use `"content":[`). The string patterns are "unrolled" (runs
# of plain chars, then one escape) so that sre scans them at C speed.
TEXT_PATTERNS = {
    "chat": re.compile(rb'"content":"([^"\\]*(?:\\.[^"\\]*)*)"'),
    "completions": re.compile(rb'"text":"([^"\\]*(?:\\.[^"\\]*)*)"'),
}
USAGE_FIELD_PATTERN = re.compile(rb',"usage":\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}')
