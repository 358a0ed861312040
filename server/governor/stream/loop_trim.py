"""Cutting a finished (non-streamed) answer right after the first copy of its loop.

``LoopDetector`` finds where the loop's first copy ends in its own folded forms of the text (lite or
norm, see ``loop_detector``); this maps that position back to the raw text.
"""

from __future__ import annotations

import re

from governor.stream.loop_detector import LoopConfig, LoopDetector

_TOKENS = re.compile(r"\s+|\d+|[^\s\d]+")  # raw text in the pieces lite is built from


def trim_to_first_copy(text: str, config: LoopConfig) -> str:
    """For non-streaming answers: the full raw text cut right after the first copy of the repeated
    block (keeps everything before the loop started). Returns text unchanged if no loop is found.

    A near-repeat ("A. B. A. C. A.") is cut just before the second occurrence of the sentence.
    """
    det = LoopDetector(config)
    det.feed(text)
    cut = det.cut
    if cut is None:
        return text
    return text[: _raw_offset(text, cut[1], numbers=cut[0] == "norm")].rstrip()


def _raw_offset(text: str, target: int, *, numbers: bool) -> int:
    """Index in ``text`` of the char that became lite (``numbers``: norm) position ``target``; mirrors _to_lite."""
    pos = 0  # chars of lite/norm produced so far
    ws_at = -1  # raw start of the whitespace run waiting to be emitted as one char
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok[0].isspace():
            if pos:  # leading whitespace is dropped
                ws_at = m.start()
            continue
        if ws_at >= 0:
            if pos == target:
                return ws_at
            pos += 1
            ws_at = -1
        if tok[0].isdecimal():
            width = 1 if numbers else len(tok)
            if target < pos + width:
                return m.start() + (0 if numbers else target - pos)
            pos += width
            continue
        for i, ch in enumerate(tok):
            if pos >= target:
                return m.start() + i
            pos += len(ch.casefold())
    return len(text)
