"""Loop detection on the streamed text of one generated choice.

Small models loop until ``max_tokens``: a line repeated verbatim, a numbered line whose number
alone changes ("22. Monday, 23. Monday, ..."), "5555...", a paragraph repeated, or one sentence
with others in between. :class:`LoopDetector` is fed the text deltas and says when the text is
certainly looping, early enough that a reader sees at most two copies of a long sentence, while
leaving legitimate repetition alone (counting, spelling, "hello hello", markdown rules, code).

Text is kept in two bounded forms built incrementally. *lite*: case-folded, each whitespace run
one ``"\\n"`` (it held a newline) or ``" "``; digits kept, so a count "1, 2, 3" never repeats.
*norm*: lite with each digit run one placeholder; what repeats only here (numbers change) needs
many more copies, as does a block that looks like code: both are often legitimate templates.

Checks run at fixed lite positions, so the decision does not depend on how the text was split
into deltas. A check is a few C-speed string operations: the last ``KEY_CHARS`` chars are looked
up backwards with ``rfind`` for candidate periods, and runs are measured by slice compares. A check
that finds no earlier copy of its key rules out the next few checkpoints (see :func:`_quiet_chars`),
which are skipped: in text that does not repeat, most checkpoints cost nothing.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from dataclasses import dataclass

from governor.stream.line_repeats import LineRepeats
from governor.stream.periodic_runs import KEY_CHARS, NEVER, find_run, has_repeated_block, nearest_key_copy

__all__ = ["LoopConfig", "LoopDetector", "LoopVerdict", "has_repeated_block"]

_CHECK_STEP = 8  # lite chars between two exact-repetition checks
_VARYING_STEP = 32  # lite chars between two number-varying checks (those fire late anyway)
_SENTENCE_CONFIRM_CHARS = 16  # chars of a sentence's 3rd copy that must match before cutting
# Templates (numbers normalised, or code-like) need this many copies: unrolled code, argument
# lists, JSON points and log lines repeat a line a few times ("NULL, NULL, NULL"); loops go on.
_TEMPLATE_MIN_COPIES = 12
_SYMBOL_MIN_COPIES = 16  # likewise for long blocks without letters: rows of a zero matrix, ASCII art
_FEED_CHUNK = 1024  # a huge delta is taken in pieces of this size, so memory stays bounded
_TRIM_SLACK = 1024  # buffers are cut back to buffer_chars once they exceed it by this much
_PLACEHOLDER = "0"  # norm's stand-in for a digit run; no other digit survives in norm

_WS_SPLIT = re.compile(r"(\s+)")
_DIGITS = re.compile(r"\d+")
_DIGIT = re.compile(r"\d")
_LETTER = re.compile(r"[^\W\d_]")
_WORD = re.compile(r"[^\W\d_]{2}")
_CODE = re.compile(r"[_()\[\]{}=;<>\\`]|[^\W\d]\.[^\W\d]")  # brackets, operators, obj.attr
# A sentence ends; a line ends; a code fence opens or closes. Every branch starts with a literal, so sre
# scans for their first chars at C speed (a leading class would make it try the branches at every char).
_EVENTS = re.compile(r"\.[ \n]|![ \n]|\?[ \n]|\n|```")
# Where to end the kept first copy, best first: before a newline, after a sentence end, after a
# clause end, before a space. The lookbehinds skip "22." style numbering (norm holds "0.").
_CUT_PREFS = (
    (re.compile(r"\n"), False),
    (re.compile(r"(?<=[^\W\d_])[.!?](?=[ \n])"), True),
    (re.compile(r"(?<=[^\W\d_])[,;:](?=[ \n])"), True),
    (re.compile(r" "), False),
)


@dataclass(frozen=True)
class LoopConfig:
    """Thresholds of the loop detector; lengths are in normalised chars."""

    enabled: bool = True
    min_sentence_chars: int = 24  # a block this long is a sentence: cut at the start of its 3rd copy
    phrase_span_chars: int = 64  # shorter blocks: cut once the run is this long and holds 3 copies
    symbol_span_chars: int = 256  # blocks without letters ("5, 5", rules) need a much longer run
    max_period_chars: int = 1024  # longest repeated block considered
    near_repeat_count: int = 3  # same sentence this many times among the last near_repeat_window
    near_repeat_window: int = 8
    buffer_chars: int = 4096  # bounded memory per stream

    def __post_init__(self) -> None:
        if min(self.min_sentence_chars, self.phrase_span_chars, self.symbol_span_chars, self.max_period_chars) < 1:
            raise ValueError("loop detector lengths must be positive")
        if self.buffer_chars < 2 * self.max_period_chars + _SENTENCE_CONFIRM_CHARS + _CHECK_STEP:
            raise ValueError("buffer_chars must hold two copies of the longest period")
        if not 2 <= self.near_repeat_count <= self.near_repeat_window:
            raise ValueError("need 2 <= near_repeat_count <= near_repeat_window")


@dataclass(frozen=True)
class LoopVerdict:
    """Why a choice was judged to loop."""

    kind: str  # "periodic" | "near_repeat"
    period_chars: int  # length of the repeated block in normalised chars
    copies: float  # copies seen


class LoopDetector:
    """Incremental loop detector for the text of one generated choice; not thread-safe."""

    def __init__(self, config: LoopConfig) -> None:
        self._cfg = config
        self._verdict: LoopVerdict | None = None
        # where trim_to_first_copy should cut: ("lite" | "norm", absolute position in that stream)
        self._cut: tuple[str, int] | None = None
        self._started = False  # leading whitespace is dropped
        self._ws = ""  # pending whitespace, emitted only once the next non-space char arrives
        self._lite = ""
        self._lite_base = 0  # absolute lite position of self._lite[0]
        self._norm, self._norm_upto = "", 0  # built lazily from lite, up to lite position _norm_upto
        self._norm_base = 0  # absolute norm position of self._norm[0]
        self._norm_digit = False  # lite char before self._norm_upto is a digit
        self._sent_start = 0  # absolute lite position where the current sentence starts
        self._scan_from = 0  # absolute lite position where the event scan resumes
        self._in_code = False  # inside a markdown code fence
        self._recent: deque[tuple[str | None, int]] = deque(maxlen=config.near_repeat_window)
        self._lines = LineRepeats()  # blocks of lines back with words or numbers changed
        self._line_start = 0  # absolute lite position where the current line starts
        # checkpoints up to these lite positions cannot fire: an exact / a number-varying check found no candidate
        self._quiet_exact = self._quiet_varying = -1
        self._quiet = _quiet_chars(config)
        self._digit_end = -NEVER  # absolute lite position just after the latest digit (none yet)

    @property
    def verdict(self) -> LoopVerdict | None:
        """The verdict once the text was judged to loop, else None."""
        return self._verdict

    @property
    def cut(self) -> tuple[str, int] | None:
        """Where the loop's first copy ends: ("lite" | "norm", absolute position in that form), or None."""
        return self._cut

    def feed(self, delta: str) -> LoopVerdict | None:
        """Add the next text delta; return the verdict once looping is certain (and ever after)."""
        if self._verdict is None and delta and self._cfg.enabled:
            lite = self._to_lite(delta)
            for i in range(0, len(lite), _FEED_CHUNK):
                if self._verdict is None:
                    self._consume(lite[i : i + _FEED_CHUNK])  # no copy when it is short
        return self._verdict

    def _to_lite(self, delta: str) -> str:
        """Case-fold ``delta`` and collapse its whitespace runs, carrying a run across deltas."""
        text = delta.casefold()
        if "\n" not in text:  # the common case, without a regex
            words = text.split()
            if not words:
                self._ws = self._ws or " "
                return ""
            lead = self._ws or (" " if text[0].isspace() else "")
            out = " ".join(words)
            if lead and self._started:
                out = lead + out
            self._started = True
            self._ws = " " if text[-1].isspace() else ""
            return out
        parts = _WS_SPLIT.split(text)  # even items are text, odd ones whitespace
        pieces: list[str] = []
        ws = self._ws
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2:
                ws = "\n" if ws == "\n" or "\n" in part else " "
                continue
            if ws and self._started:
                pieces.append(ws)
            ws = ""
            self._started = True
            pieces.append(part)
        self._ws = ws
        return "".join(pieces)

    def _consume(self, piece: str) -> None:
        """Append lite text and run, in stream order, the sentence ends and checkpoints it passes."""
        if not piece:
            return
        base = self._lite_base
        start = base + len(self._lite)
        self._lite = lite = self._lite + piece
        end = start + len(piece)
        digit = _DIGIT.search(piece[::-1])
        if digit is not None:
            self._digit_end = end - digit.start()
        checkpoint = self._next_checkpoint(start)
        m = _EVENTS.search(lite, self._scan_from - base)
        while m is not None or checkpoint <= end:
            if m is not None and (checkpoint > end or base + m.end() <= checkpoint):
                self._scan_from = base + m.end()
                event = m.group()
                if event == "```":
                    self._in_code = not self._in_code
                    self._lines.reset()
                elif event == "\n":
                    self._recent.append((None, 0))  # a line without a sentence end (code, a label)
                    self._end_line(self._scan_from)
                else:
                    self._end_sentence(self._scan_from)
                    if event[-1] == "\n" and self._verdict is None:
                        self._end_line(self._scan_from)
                m = _EVENTS.search(lite, m.end())
            else:
                self._check(checkpoint)
                checkpoint = self._next_checkpoint(checkpoint)
            if self._verdict is not None:
                return
        self._scan_from = max(self._scan_from, end - 2)  # an event may straddle the next piece
        cap = self._cfg.buffer_chars
        if len(lite) > cap + _TRIM_SLACK:
            self._sync_norm(end)  # norm is built from lite: before lite lets go of the text
            # every later look-back starts at or after ``end`` and reaches at most cap chars back
            self._lite = lite[len(lite) - cap :]
            self._lite_base = end - cap

    def _end_sentence(self, end: int) -> None:
        """Near-repeat bookkeeping for the sentence that ends at absolute lite position ``end``."""
        start = max(self._sent_start, end - self._cfg.buffer_chars)
        self._sent_start = end
        raw = self._lite[start - self._lite_base : end - self._lite_base]
        text = raw.strip()
        if not text:
            return
        start += len(raw) - len(raw.lstrip())
        # Only prose counts: a sentence ends in . ! ? (a line break does not split it but takes a
        # window place, so one recurring across code lines is far apart), holds a word and sits
        # outside a code fence. Numbers are kept: one recurring with other numbers is usually a
        # template (log lines); a contiguous loop of those is left to the periodic check.
        norm_len = len(_DIGITS.sub(_PLACEHOLDER, text))
        prose = not self._in_code and _WORD.search(text) is not None
        key = text if prose and norm_len >= self._cfg.min_sentence_chars else None
        self._recent.append((key, start))
        if key is None:
            return
        starts = [s for k, s in self._recent if k == key]
        if len(starts) >= self._cfg.near_repeat_count:
            self._verdict = LoopVerdict("near_repeat", norm_len, float(len(starts)))
            self._cut = ("lite", starts[1])  # keep everything before the second occurrence

    def _end_line(self, end: int) -> None:
        """Block near-repeat bookkeeping for the line that ends (after its newline) at ``end``."""
        start = max(self._line_start, self._lite_base)
        self._line_start = end
        if self._in_code:
            return
        found = self._lines.end_line(self._lite[start - self._lite_base : end - 1 - self._lite_base], start)
        if found is not None:
            self._verdict = LoopVerdict("near_repeat", found.chars, found.copies)
            self._cut = ("lite", found.cut)

    def _exact_ruled_out(self, at: int) -> bool:
        return at <= self._quiet_exact

    def _varying_ruled_out(self, at: int) -> bool:
        # or no digit in the last max_period lite chars: then norm's window below holds no number
        return at <= self._quiet_varying or self._digit_end <= at - self._cfg.max_period_chars

    def _next_checkpoint(self, after: int) -> int:
        """The first checkpoint past lite position ``after`` whose check is not ruled out."""
        at = after - after % _CHECK_STEP + _CHECK_STEP
        if not self._exact_ruled_out(at):
            return at
        exact = self._quiet_exact - self._quiet_exact % _CHECK_STEP + _CHECK_STEP
        varying = max(at, self._quiet_varying + 1)
        varying += -varying % _VARYING_STEP
        # without a new digit (a piece brings its digits before its checks), later ones are ruled out too
        return exact if self._varying_ruled_out(varying) else min(exact, varying)

    def _check(self, at: int) -> None:
        """Periodicity checks on the text up to absolute lite position ``at`` (those not ruled out)."""
        cfg = self._cfg
        end = at - self._lite_base
        if not self._exact_ruled_out(at) and end > KEY_CHARS:
            first = nearest_key_copy(self._lite, end, cfg.max_period_chars)
            if first < 0:
                self._quiet_exact = at + self._quiet[0]
            else:
                run = find_run(self._lite, end, cfg.max_period_chars, cfg.buffer_chars, self._exact_needs,
                                floor=self._prose_needs, first=first)  # fmt: skip
                if run is not None:
                    self._fire(run, "lite", self._lite, end, self._lite_base)
                    return
        if at % _VARYING_STEP or self._varying_ruled_out(at):
            return
        self._sync_norm(at)
        norm = self._norm
        recent = norm[-cfg.max_period_chars :]
        # cheap gate (a regex letter scan is slow): a number, and a letter (cased, or not ASCII)
        if len(norm) > KEY_CHARS and _PLACEHOLDER in recent and (recent.upper() != recent or not recent.isascii()):
            first = nearest_key_copy(norm, len(norm), cfg.max_period_chars)
            if first < 0:
                # norm grows no faster than lite, so lite positions bound the norm chars in between
                self._quiet_varying = at + self._quiet[1]
                return
            run = find_run(norm, len(norm), cfg.max_period_chars, cfg.buffer_chars, self._varying_needs,
                            floor=self._template_needs, first=first)  # fmt: skip
            if run is not None:
                self._fire(run, "norm", norm, len(norm), self._norm_base)

    def _sync_norm(self, at: int) -> None:
        """Extend norm with the lite text up to absolute position ``at``."""
        seg = self._lite[self._norm_upto - self._lite_base : at - self._lite_base]
        if not seg:
            return
        norm = _DIGITS.sub(_PLACEHOLDER, seg)
        if self._norm_digit and seg[0].isdecimal():
            norm = norm[1:]  # the digit run goes on: its placeholder is already there
        self._norm_digit = seg[-1].isdecimal()
        self._norm_upto = at
        self._norm += norm
        cap = self._cfg.buffer_chars
        if len(self._norm) > cap + _TRIM_SLACK:
            self._norm_base += len(self._norm) - cap
            self._norm = self._norm[-cap:]

    def _exact_needs(self, block: str, period: int) -> int:
        """The run length (chars) at which an exactly repeated ``block`` counts as a loop."""
        cfg = self._cfg
        if not _LETTER.search(block):
            return max(cfg.symbol_span_chars, _SYMBOL_MIN_COPIES * period)
        if self._in_code or _CODE.search(block):
            return self._template_needs(period)
        return self._prose_needs(period)

    def _prose_needs(self, period: int) -> int:
        """The threshold for prose, the lowest of all: a lower bound that needs no look at the block."""
        return _prose_needs(self._cfg, period)

    def _template_needs(self, period: int) -> int:
        return _template_needs(self._cfg, period)

    def _varying_needs(self, block: str, period: int) -> int:
        """The run length for a block that repeats only once numbers are normalised."""
        if _PLACEHOLDER in block and _WORD.search(block):
            return self._template_needs(period)
        return NEVER  # no number (the exact check judged it) or no word: "7 x 8 = 56" is no loop

    def _fire(self, run: tuple[int, int], stream: str, buf: str, end: int, base: int) -> None:
        period, span = run
        self._verdict = LoopVerdict("periodic", period, round(span / period, 2))
        self._cut = (stream, base + _first_copy_end(buf, end - span, period))


def _prose_needs(cfg: LoopConfig, period: int) -> int:
    if period >= cfg.min_sentence_chars:
        return 2 * period + min(_SENTENCE_CONFIRM_CHARS, period - 1)
    return max(cfg.phrase_span_chars, 3 * period)


def _template_needs(cfg: LoopConfig, period: int) -> int:
    return max(cfg.phrase_span_chars, _TEMPLATE_MIN_COPIES * period)


@functools.lru_cache(maxsize=256)
def _quiet_chars(cfg: LoopConfig) -> tuple[int, int]:
    """How many chars past a check that found no earlier copy of its key the next checks cannot fire:
    (exact checks, number-varying checks).

    find_run fires for a period only on a run of at least floor(period) chars, whose last
    floor(period) - period chars (never fewer than the key) equal the chars one period before them.
    A checkpoint at most that length minus KEY_CHARS before the run's end has its whole key inside
    that stretch, so it would have found the key one period back. Conversely, once a check finds no
    copy, every checkpoint up to the smallest such length minus KEY_CHARS later cannot fire and is
    skipped: the decisions, and where they are taken, stay those of checking every checkpoint.
    """
    periods = range(1, cfg.max_period_chars + 1)
    exact = min(max(KEY_CHARS, _prose_needs(cfg, p) - p) for p in periods)
    varying = min(max(KEY_CHARS, _template_needs(cfg, p) - p) for p in periods)
    return exact - KEY_CHARS, varying - KEY_CHARS


def _first_copy_end(buf: str, run_start: int, period: int) -> int:
    """Buffer index just after the first copy of a run, moved to a natural boundary if one is near."""
    lo = run_start + period - 1  # a copy may end in its (collapsed) whitespace
    for pattern, after in _CUT_PREFS:
        m = pattern.search(buf, max(run_start, lo - after), run_start + 2 * period)
        if m is not None:
            return m.end() if after else m.start()
    return run_start + period
