"""Server-sent events: splitting upstream bytes into events and formatting our own."""

from __future__ import annotations

from typing import Any

import orjson

from governor.errors import GovernorError, error_body

DONE = b"data: [DONE]\n\n"
_SEP = b"\n\n"


class EventSplitter:
    """Turns arbitrary byte chunks into complete SSE `data:` payloads (without the prefix)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        if _SEP not in buf:
            self._buf = buf
            return []
        parts = buf.split(_SEP)
        self._buf = parts.pop()
        out = []
        for part in parts:
            # vLLM sends one `data:` line per event; tolerate CRLF and comment lines anyway.
            for line in part.split(b"\n"):
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    out.append(line[6:] if line[5:6] == b" " else line[5:])
        return out


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + _SEP


def raw_event(payload: bytes) -> bytes:
    return b"data: " + payload + _SEP


def error_event(exc: GovernorError) -> bytes:
    """An error inside a stream: the OpenAI envelope as an event (openai-python raises APIError on it)."""
    return event(error_body(exc))
