"""Near-repeats of blocks of lines, for the loop detector.

A small model's stanza often comes back with a word changed in each line, and a numbered list
often cycles through the same items while its numbers grow. Neither is an exact periodic repeat,
and DRY, which treats a line break as a sequence breaker, cannot see either. This tracker compares
each finished line with the few lines before it and keeps, for every distance ``d``, how many lines
in a row matched the line ``d`` before them. Per line that is one regex pass over the line and a
set comparison with each of the last ``max_lines`` lines (a sequence compare only where most
words are shared), so it costs nothing per token.

A line matches an earlier one when both are equal, or equal once numbers are normalised, or (prose
of ≥ 3 words) share most of their words in order. Lists stay out: consecutive lines that match
each other this loosely ("Week 3: run 4 km", "Bob brings the bread") are one template, so at
distance 1 only an exact copy counts, and a looser match at a longer distance counts only when the
line does not match its own neighbour the same way. Code-like lines (brackets, ``=``, table pipes)
and lines inside a code fence break every run: repeated code is the periodic check's business.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from difflib import SequenceMatcher

_DIGITS = re.compile(r"\d+")
_WORD = re.compile(r"[^\W\d_]{2,}")
_CODE = re.compile(r"[{}\[\]();=<>`|]")
_MIN_WORDS = 3  # prose lines this long may match with a word changed
_NEAR = 0.7  # word-sequence similarity: one word changed in a 4-word line is 0.75
_SHARED = 0.5  # cheap gate before the sequence compare: share of distinct words (Jaccard)
_BLOCK_WORDS = 6  # a repeated block needs this many words: "Week 3:" / "Day 2:" are labels
_LONG_LINES, _LONG_CHARS = 3, 120  # a block this big is a loop after two copies, not three


@dataclass(frozen=True)
class _Line:
    text: str
    norm: str
    seq: tuple[str, ...]
    words: frozenset[str]
    n_words: int
    start: int  # where the line starts in the caller's stream


@dataclass(frozen=True)
class BlockRepeat:
    """A block of ``lines`` lines back ``copies`` times; ``cut`` is where its second copy starts."""

    lines: int
    chars: int
    copies: float
    cut: int


class LineRepeats:
    """Per-stream state: the last lines, and per distance the run of matching lines."""

    def __init__(self, max_lines: int = 12) -> None:
        self._lines: deque[_Line] = deque(maxlen=max_lines)
        # distance -> (lines in the run, where the run's first line starts, run length at its last inexact match)
        self._runs: dict[int, tuple[int, int, int]] = {}

    def reset(self) -> None:
        """Code or a fence: runs end here."""
        self._lines.clear()
        self._runs = {}

    def end_line(self, text: str, start: int) -> BlockRepeat | None:
        """Add a finished line (case-folded, whitespace collapsed) that starts at ``start``."""
        text = text.strip()
        if not text:
            return None
        if _CODE.search(text):
            self.reset()
            return None
        norm = _DIGITS.sub("0", text)
        words = _WORD.findall(norm)
        line = _Line(text, norm, tuple(words), frozenset(words), len(words), start)
        lines = self._lines
        prev = lines[-1] if lines else None
        same_prev = prev is not None and prev.norm == norm
        loose_prev = prev is not None and (same_prev or _close(line, prev))
        runs: dict[int, tuple[int, int, int]] = {}
        found = None
        for d in range(1, len(lines) + 1):
            other = lines[-d]
            exact = line.text == other.text
            if not exact:
                if d == 1 or not _close(line, other):
                    continue
                # "Alice brings 9 cups" back after Bob and Carol: a cycle, though Bob's line is close
                if same_prev if other.norm == norm else loose_prev:
                    continue
            run, run_start, inexact = self._runs.get(d, (0, start, 0))
            run += 1
            runs[d] = (run, run_start, run if not exact else inexact)
            if found is None:
                found = self._judge(d, runs[d], line)
        self._runs = runs
        lines.append(line)
        return found

    def _judge(self, d: int, state: tuple[int, int, int], line: _Line) -> BlockRepeat | None:
        run, run_start, inexact = state
        if run < d or not inexact:
            return None  # not a full copy yet, or every line an exact copy (the periodic check's case)
        block = [line, *(self._lines[-k] for k in range(1, d))]  # the latest copy
        if sum(x.n_words for x in block) < max(_BLOCK_WORDS, 2 * d):
            return None  # labels ("Week 3:") or a calendar of bare names ("8. Monday") are no loop
        chars = sum(len(x.text) for x in block)
        if run >= 2 * d or (d >= _LONG_LINES and chars >= _LONG_CHARS):
            return BlockRepeat(d, chars, round((run + d) / d, 2), run_start)
        return None


def _close(a: _Line, b: _Line) -> bool:
    """Equal once numbers are normalised, or prose whose words mostly come back in order."""
    if a.norm == b.norm:
        return True
    if min(a.n_words, b.n_words) < _MIN_WORDS:
        return False
    inter = len(a.words & b.words)
    if inter < _SHARED * (len(a.words) + len(b.words) - inter):
        return False
    return SequenceMatcher(None, a.seq, b.seq, autojunk=False).ratio() >= _NEAR
