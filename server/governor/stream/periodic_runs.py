"""Periodic runs in a string: the search behind the loop detector's checks, and the eval's definition
of looping built on it (:func:`has_repeated_block`).

A run ends at a given position and repeats with some period back from there. Candidate periods come
from earlier copies of the last ``KEY_CHARS`` chars (``str.rfind``), runs are measured by galloping
slice compares: a few C-speed string operations per search.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["KEY_CHARS", "NEVER", "common_suffix", "find_run", "has_repeated_block", "nearest_key_copy"]

KEY_CHARS = 16  # tail length looked up to find candidate periods
NEVER = 1 << 62  # "no threshold"
_MAX_BLOCK_CHARS = 1024  # longest block has_repeated_block seeks
_WS_SPLIT = re.compile(r"(\s+)")
_DIGITS = re.compile(r"\d+")
_ALNUM = re.compile(r"[^\W_]")
Needs = Callable[[str, int], int]  # (block, period) -> run length at which it is a loop


def nearest_key_copy(buf: str, end: int, max_period: int, key: int = KEY_CHARS) -> int:
    """Where find_run's first candidate starts: the nearest earlier copy of the key ending at ``end``, else -1."""
    return buf.rfind(buf[end - key : end], max(0, end - key - max_period), end - 1)


def find_run(
    buf: str, end: int, max_period: int, history: int, needs: Needs, key: int = KEY_CHARS, tries: int = 8,
    floor: Callable[[int], int] | None = None, first: int | None = None,
) -> tuple[int, int] | None:  # fmt: skip
    """The (period, span) of a periodic run ending at ``buf[end]`` that meets ``needs``, else None.

    Candidate periods come from earlier occurrences of the ``key`` chars before ``end``, nearest
    first. A run found for one period also covers that period's multiples, so the search goes on
    only before that run: a multiple is never judged as a separate, longer "sentence". Spans are
    measured over at most ``history`` chars, so they do not depend on when the buffer was trimmed.
    ``floor(period)``, a lower bound of ``needs`` for any block, lets a short run be dismissed
    before ``needs`` looks at the block (most candidates in ordinary text are a few shared words).
    ``first``: the nearest candidate (:func:`nearest_key_copy`) when the caller has looked it up.
    """
    if end <= key:
        return None
    tail = buf[end - key : end]
    lo = max(0, end - key - max_period)
    hi = end - 1
    for attempt in range(tries):
        q = first if attempt == 0 and first is not None else buf.rfind(tail, lo, hi)
        if q < 0:
            return None
        period = end - key - q
        limit = min(end, history) - period
        least = floor(period) if floor is not None else 0
        span = period + common_suffix(buf, end, period, key, min(limit, least - period)) if least else period + key
        if span >= least:
            needed = needs(buf[max(0, end - period - 2) : end], period)  # 2 more: "a.b" may straddle the cut
            # measure as far as the threshold (or, never firing, to skip the run); all of it for the cut
            reach = needed - period if needed < NEVER else max_period + key
            span = period + common_suffix(buf, end, period, span - period, min(limit, reach))
        else:
            needed = NEVER
        if span >= needed:
            return period, period + common_suffix(buf, end, period, span - period, limit)
        hi = min(q + key - 1, end - span - 1 + key)
        if hi - lo < key:
            return None
    return None


def common_suffix(buf: str, end: int, period: int, known: int, limit: int) -> int:
    """Chars before ``end`` that keep period ``period`` (``known`` to ``limit``), by galloping slice compares."""
    length = known
    step = 64
    while length < limit:
        n = min(step, limit - length)
        a = end - length
        if buf[a - n : a] == buf[a - n - period : a - period]:
            length += n
            step *= 2
        elif n == 1:
            break
        else:
            step = n // 2
    return length


def has_repeated_block(
    text: str, min_copies: int = 3, min_block_chars: int = 10, *, normalise_numbers: bool = False
) -> bool:
    """Evaluation helper: True if the text holds a block repeated ``min_copies`` or more times in a row.

    This is the eval's definition of "looping". The text is compared case-folded with whitespace
    runs collapsed; digits count as themselves unless ``normalise_numbers`` (then every digit run
    is one placeholder, so "5555" is no longer a repeat but "1. Monday 2. Monday" is). A block
    must be ``min_block_chars`` to ``_MAX_BLOCK_CHARS`` long and hold a letter or digit, so rules
    ("-----", "|---|---|") and a short word said a few times ("hello hello hello hello hello",
    "ha ha ha") are not loops, while a short phrase repeated at length is (a block of several
    copies reaches the minimum). 10 chars, about two words, is the shortest block whose three
    copies in a row read as a stuck model rather than emphasis.
    """
    lite = _WS_SPLIT.sub(" ", text.casefold()).strip() + " "  # so the last copy has its separator too
    if normalise_numbers:
        lite = _DIGITS.sub("0", lite)
    key_len = max(1, min(KEY_CHARS, min_block_chars))

    def needs(block: str, period: int) -> int:
        if not _ALNUM.search(block):
            return NEVER
        block_len = -(-min_block_chars // period) * period  # smallest multiple of the period
        return min_copies * block_len if block_len <= _MAX_BLOCK_CHARS else NEVER

    # A run is found from its own end; trying every end keeps this exact up to the candidate cap.
    n = len(lite)
    return any(find_run(lite, e, _MAX_BLOCK_CHARS, n, needs, key_len, 64) for e in range(key_len + 1, n + 1))
