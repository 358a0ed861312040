"""The eval's own loop judgment: does an answer loop? Independent of the gateway's loop cut.

The gateway's detector decides early on a stream; this judge looks at a finished answer, slowly
and with more context, so that the eval does not measure the cut with its own ruler. An answer
loops when it holds any of:

- an *exact periodic repeat*: a block of ≥ 10 chars (case and whitespace folded) three or more
  times in a row, e.g. "the end. the end. the end." or "5555…". A block made of one repeated
  token ("| yes | yes |", "ha ha ha") needs a long run: tables and emphasis repeat a cell.
- a *near-repeat*: the answer cut into units (lines, and sentences within long lines) holds a run
  of units that comes back with a word changed (numbers normalised), three copies in a row, or two
  copies of a long block (≥ 3 units and ≥ 100 chars) that fill half the answer. That is a stanza
  back with one word changed per line, or a numbered list cycling through the same names while
  its numbers grow. A refrain or chorus between new verses is not a run: the verses break it.
- a *recurring sentence*: one prose unit back ≥ 6 times anywhere (a chorus comes back 3-4 times).

Templates are left alone: one line whose numbers alone change ("Week 3: run 4 km") is a list, and
code or JSON units (brackets, ``key: value`` pairs, fenced blocks) only count when exactly equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import SequenceMatcher

import numpy as np

__all__ = ["LoopJudgment", "judge"]

MIN_BLOCK_CHARS = 10  # shortest block whose three copies in a row read as a stuck model
SINGLE_TOKEN_RUN_CHARS = 80  # a block of one repeated token must run this long ("| yes | yes |" is a table)
MAX_PERIOD_CHARS = 600
NEAR_RATIO = 0.7  # token-sequence similarity of two units that count as one unit back with a word changed
LONG_BLOCK_UNITS, LONG_BLOCK_CHARS = 3, 100  # two copies of a block this big filling half the answer loop
RECUR_COUNT = 6  # the same prose unit this many times anywhere
PROSE_MIN_WORDS = 3

_WS = re.compile(r"\s+")
_DIGITS = re.compile(r"\d+")
_TOKEN = re.compile(r"[^\W_]+")
_WORD = re.compile(r"[^\W\d_]{2,}")
_SENTENCE = re.compile(r"(?<=[^\W\d_][.!?])\s+(?=\S)")  # not after "12."
_CODE = re.compile(r"[{}\[\];=<>`]|\":|\w\(|^\s*[-*]?\s*\"?\w+\"?:\s*\S*$")


@dataclass(frozen=True)
class LoopJudgment:
    """Why an answer was judged to loop."""

    kind: str  # "periodic" | "near_repeat" | "recurring"
    copies: float
    block: str  # the repeated block (folded), for reading reports


@dataclass(frozen=True)
class _Unit:
    text: str  # folded, digits kept
    norm: str  # folded, each digit run "0"
    tokens: tuple[str, ...]  # norm's tokens
    words: int  # tokens of letters only, ≥ 2 long
    code: bool


def judge(text: str) -> LoopJudgment | None:
    """The first loop found in ``text``, else None."""
    return _periodic(text) or _near_repeat(_units(text))


def _periodic(text: str) -> LoopJudgment | None:
    lite = _WS.sub(" ", text.casefold()).strip() + " "
    n = len(lite)
    if n < 3 * MIN_BLOCK_CHARS:
        return None
    codes = np.frombuffer(lite.encode("utf-32-le"), dtype=np.uint32)
    for period in range(1, min(MAX_PERIOD_CHARS, n // 3) + 1):
        block_len = -(-MIN_BLOCK_CHARS // period) * period
        need = 2 * block_len  # equal chars at distance `period`: 3 copies of the block
        eq = codes[period:] == codes[:-period]
        if int(eq.sum()) < need:
            continue
        for start, length in _runs(eq, need):
            block = lite[start : start + period]
            tokens = set(_TOKEN.findall(block * 2))  # a token may straddle the block's ends
            if not tokens:
                continue  # rules, ASCII art
            if len(tokens) == 1 and length + period < SINGLE_TOKEN_RUN_CHARS:
                continue
            return LoopJudgment("periodic", round((length + period) / period, 1), block.strip())
    return None


def _runs(eq: np.ndarray, need: int) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in ``eq`` at least ``need`` long."""
    padded = np.concatenate(([0], eq.view(np.int8) if eq.dtype == np.bool_ else eq.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    keep = ends - starts >= need
    return list(zip(starts[keep].tolist(), (ends - starts)[keep].tolist(), strict=True))


def _units(text: str) -> list[_Unit]:
    units: list[_Unit] = []
    fenced = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        for part in _SENTENCE.split(line.strip()) if not fenced else [line]:
            folded = _WS.sub(" ", part.casefold()).strip()
            if not _TOKEN.search(folded):
                continue  # blank lines, rules
            norm = _DIGITS.sub("0", folded)
            code = fenced or bool(_CODE.search(folded))
            units.append(_Unit(folded, norm, tuple(_TOKEN.findall(norm)), len(_WORD.findall(norm)), code))
    return units


class _Similar:
    """Cached unit similarity at a distance ``period``.

    At period 1 only an exact copy counts: consecutive lines that differ in a number or a word
    ("Week 3: run 4 km", "Bob brings flour") are a list. At a longer period a unit also matches one
    with its numbers changed or (prose) a word changed, unless it is that close to its own
    neighbour too: then the lines are one template, not a cycle of several items.
    """

    def __init__(self, units: list[_Unit]) -> None:
        self.units = units
        self.cache: dict[tuple[int, int], bool] = {}

    def __call__(self, i: int, j: int) -> bool:
        a, b = self.units[i], self.units[j]
        if a.text == b.text:
            return True
        if j - i == 1 or not self.close(i, j):
            return False
        nxt = self.units[i + 1]
        if a.norm == b.norm:
            return a.norm != nxt.norm  # "Alice brings 3 cups" back as "Alice brings 9 cups", Bob in between
        return not self.close(i, i + 1)

    def close(self, i: int, j: int) -> bool:
        """Equal with numbers normalised, or prose with a word or two changed."""
        a, b = self.units[i], self.units[j]
        if a.norm == b.norm:
            return True
        if a.code or b.code or min(a.words, b.words) < PROSE_MIN_WORDS:
            return False
        key = (i, j)
        if key not in self.cache:
            sa, sb = set(a.tokens), set(b.tokens)
            if len(sa & sb) / len(sa | sb) < 0.4:
                self.cache[key] = False
            else:
                self.cache[key] = SequenceMatcher(None, a.tokens, b.tokens, autojunk=False).ratio() >= NEAR_RATIO
        return self.cache[key]


def _near_repeat(units: list[_Unit]) -> LoopJudgment | None:
    n = len(units)
    similar = _Similar(units)
    for period in range(1, n // 2 + 1):
        run = 0
        for i in range(n - period):
            if similar(i, i + period):
                run += 1
                if _is_loop(units, i + 1 - run, period, run, n):
                    block = " / ".join(u.text for u in units[i + 1 - run : i + 1 - run + period])
                    return LoopJudgment("near_repeat", round((run + period) / period, 1), block[:200])
            else:
                run = 0
    return _recurring(units)


def _is_loop(units: list[_Unit], start: int, period: int, run: int, n: int) -> bool:
    block = units[start : start + period]
    if sum(u.words for u in block) < max(2 * PROSE_MIN_WORDS, 2 * period) or all(u.code for u in block):
        return False  # "Week 3:" / "7 x 3 = 21" / a calendar of bare day names: templates without prose
    if run >= 2 * period:
        return True
    chars = sum(len(u.text) for u in block)
    return period >= LONG_BLOCK_UNITS and chars >= LONG_BLOCK_CHARS and run >= period and 2 * (run + period) >= n


def _recurring(units: list[_Unit]) -> LoopJudgment | None:
    seen: dict[str, int] = {}
    for u in units:
        if u.code or u.words < PROSE_MIN_WORDS + 1:
            continue
        seen[u.text] = seen.get(u.text, 0) + 1
        if seen[u.text] >= RECUR_COUNT:
            return LoopJudgment("recurring", float(seen[u.text]), u.text)
    return None
