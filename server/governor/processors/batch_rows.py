"""Host bookkeeping of the Governor processor: which request holds each batch row, how much of its
output is in the device history, and which device rows the batch's changes left to move, blank or
rewrite.

vLLM reports each change (a row removed, added, moved or swapped); each costs O(1) here and is
only recorded: the device work for all of them is done at the next ``apply`` in a few batched
ops. Rows ``[0, count)`` are processed, ``count`` being one past the highest row with a request;
rows among them without one are blank on the device and cost nothing but their share of each
slice. The per-row lists are exactly ``count`` long so the steady step can check and extend every
row with C-level passes (``map``), never a Python loop; a batch change touches the rows it names,
and the rows that did not simply gain one token (found with numpy, handled one by one).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import compress
from operator import add, itemgetter, ne
from typing import NamedTuple

import numpy as np

from governor.processors.base import int64s, settled_length
from governor.processors.request_configs import RequestConfig, RequestConfigs

# Stands in for the output of a row without a request in the steady step's passes: always two
# tokens long (and expected so: it does not grow), the last one settled and equal to the one before.
_IDLE_OUTPUT = [0, 0]
_IDLE_CONSUMED, _IDLE_LAST = 2, 0
_LAST = itemgetter(-1)
_BEFORE_LAST = itemgetter(-2)
_NEGATIVE = (0).__gt__


@dataclass(slots=True)
class Request:
    """A participating request: its config, the prompt tokens it keeps in the history, vLLM's live output."""

    config: RequestConfig
    prompt: list[int]  # [] when none of its controls looks at the prompt
    output: list[int]


class _Held(NamedTuple):
    """Everything one row holds, carried along by a move or swap."""

    request: Request | None
    output: list[int]
    consumed: int
    last: int
    config: int
    prompt_len: int
    rewrite: bool
    source: int  # the device row holding its history (the row itself unless moved since the last apply)


class Settled(NamedTuple):
    """The rows' progress since the last apply, as ``BatchRows.settle`` found it."""

    appended_rows: np.ndarray  # rows that gained exactly one settled token
    appended_tokens: np.ndarray
    rewrite: list[tuple[int, int]]  # (row, settled output length) to write whole
    advanced: bool  # some row gained a token: the newest column moves right
    longest: int  # longest history (kept prompt + settled output) among the rows


class BatchRows:
    """Per-row host state and the device work pending since the last apply."""

    def __init__(self, configs: RequestConfigs) -> None:
        self.configs = configs
        self.requests: dict[int, Request] = {}
        self.count = 0
        self.outputs: list[list[int]] = []
        self.consumed: list[int] = []  # output tokens already in the device history
        self.last: list[int] = []  # output[consumed - 1] when it was written
        self.expect: list[int] = []  # consumed + 1: a steady step adds one token to every row
        self.fresh: set[int] = set()  # rows with nothing consumed yet (their output is too short for the fast check)
        self.grows: list[int] = []  # 1 for a row with a request, 0 for an idle one
        self.config = np.zeros(8, dtype=np.int64)  # config index per row (0: no request)
        self.prompt_len = np.zeros(8, dtype=np.int64)
        self.rewrite: set[int] = set()  # rows whose device history must be written whole
        self.blank: set[int] = set()  # rows whose device history must be cleared
        self.source: dict[int, int] = {}  # row -> device row holding its history, after moves

    @property
    def changed(self) -> bool:
        return bool(self.rewrite or self.blank or self.source)

    # ---- vLLM's changes ---------------------------------------------------------------------------

    def remove(self, row: int) -> None:
        request = self.requests.pop(row, None)
        if request is not None:
            self.configs.release(request.config)
        self._put(row, self._idle(row))

    def add(self, row: int, config: RequestConfig | None, prompt: list[int] | None, output: list[int]) -> None:
        """A request entering ``row`` (replacing whoever held it); ``output`` is vLLM's live list."""
        self.remove(row)
        if config is None:
            return
        kept = (prompt or []) if config.keeps_prompt else []
        request = Request(config, kept, output)
        self._put(row, _Held(request, output, 0, -1, config.index, len(kept), True, row))

    def move(self, a: int, b: int, swap: bool) -> None:
        """Row a's request goes to b; b's comes to a (swap) or leaves the batch (one-way move)."""
        held_a, held_b = self._take(a), self._take(b)
        if swap:
            self._put(a, held_b)
        else:
            if held_b.request is not None:
                self.configs.release(held_b.request.config)
            self._put(a, self._idle(a))
        self._put(b, held_a)

    def fit(self) -> None:
        """Trim the per-row lists to one past the highest row with a request."""
        count, requests = self.count, self.requests  # _put raised it for rows added above
        while count and count - 1 not in requests:
            count -= 1
        self._cover(count - 1)
        del self.outputs[count:], self.consumed[count:], self.last[count:], self.expect[count:], self.grows[count:]
        self.count = count

    def _idle(self, row: int) -> _Held:
        return _Held(None, _IDLE_OUTPUT, _IDLE_CONSUMED, _IDLE_LAST, 0, 0, False, row)

    def _cover(self, row: int) -> None:
        """Make the per-row lists and arrays reach ``row``."""
        extra = row + 1 - len(self.outputs)
        if extra > 0:
            self.outputs += [_IDLE_OUTPUT] * extra
            self.consumed += [_IDLE_CONSUMED] * extra
            self.last += [_IDLE_LAST] * extra
            self.expect += [_IDLE_CONSUMED] * extra
            self.grows += [0] * extra
        have = self.config.shape[0]
        if row >= have:
            more = np.zeros(max(row + 1, 2 * have) - have, dtype=np.int64)
            self.config = np.concatenate([self.config, more])
            self.prompt_len = np.concatenate([self.prompt_len, more])

    def _take(self, row: int) -> _Held:
        self._cover(row)
        held = _Held(
            self.requests.pop(row, None), self.outputs[row], self.consumed[row], self.last[row],
            int(self.config[row]), int(self.prompt_len[row]), row in self.rewrite, self.source.pop(row, row),
        )  # fmt: skip
        self.rewrite.discard(row)
        self.blank.discard(row)
        self.fresh.discard(row)
        return held

    def _put(self, row: int, held: _Held) -> None:
        self._cover(row)
        self.outputs[row], self.consumed[row], self.last[row] = held.output, held.consumed, held.last
        self.config[row], self.prompt_len[row] = held.config, held.prompt_len
        self.grows[row] = held.request is not None
        self.expect[row] = _IDLE_CONSUMED if held.request is None else held.consumed + 1
        self.source.pop(row, None)
        self.rewrite.discard(row)
        self.blank.discard(row)
        self.fresh.discard(row)
        if held.request is None:
            self.requests.pop(row, None)
            self.blank.add(row)  # cheaper to clear than to track whether it already is
            return
        self.requests[row] = held.request
        self.count = max(self.count, row + 1)
        if not held.consumed:
            self.fresh.add(row)
        if held.rewrite:
            self.rewrite.add(row)
        elif held.source != row:
            self.source[row] = held.source

    # ---- at apply -----------------------------------------------------------------------------------

    def take_moves(self) -> tuple[list[int], list[int]]:
        """(sources, targets) of the device rows to copy for rows whose request moved; clears the record."""
        moves = [(src, dst) for dst, src in self.source.items() if dst not in self.rewrite]
        self.source.clear()
        return [src for src, _ in moves], [dst for _, dst in moves]

    def take_blanks(self) -> list[int]:
        """Rows left without a request, to clear (rows to rewrite are cleared too: see ``settle``)."""
        rows = list(self.blank)
        self.blank.clear()
        return rows

    def settle(self) -> Settled:
        """Find each row's progress since the last apply and record it as consumed.

        A row that gained exactly one settled token is appended at the new column: found for all
        rows at once with C-level passes over the output lists (as the steady step does) and numpy,
        so the Python work is per row changed; a new row, one whose tokens were dropped or
        regenerated, one that gained several, or, when the column moves, one that gained none, is
        rewritten whole.
        """
        n, outputs = self.count, self.outputs
        odd = self.rewrite | self.fresh  # looked at one by one: their outputs may be too short to pass
        try:
            lengths, newest, before = _ends(outputs, odd)
        except IndexError:  # a row's output shrank below two tokens: it is odd (length check below)
            lengths = list(map(len, outputs))
            newest = [o[-1] if k else -1 for o, k in zip(outputs, lengths, strict=True)]
            before = [o[-2] if k > 1 else -1 for o, k in zip(outputs, lengths, strict=True)]
        range_n = range(n)
        odd.update(compress(range_n, map(ne, lengths, self.expect)))
        odd.update(compress(range_n, map(ne, before, self.last)))
        if n and min(newest) < 0:  # placeholders (async scheduling): rare, so looked for only then
            odd.update(compress(range_n, map(_NEGATIVE, newest)))
        part = self.config[:n] > 0
        one = part.copy()
        one[np.fromiter(odd, dtype=np.int64, count=len(odd))] = False
        rows = np.flatnonzero(one)
        tokens = int64s(newest)[rows]
        # Rows that gained one token (and idle rows, whose stand-in output never changes) now hold
        # their whole output; the odd rows are set below.
        consumed, last, old_consumed, old_last = lengths, newest, self.consumed, self.last
        rewrite: list[tuple[int, int]] = []
        stay: list[tuple[int, int]] = []
        extra: list[tuple[int, int]] = []  # (row, token): one token, then a placeholder, or a first token
        for row in sorted(odd):
            if not part[row]:
                consumed[row], last[row] = _IDLE_CONSUMED, _IDLE_LAST
                continue
            output, done = outputs[row], old_consumed[row]
            count = settled_length(output)
            if row in self.rewrite or count < done or (done and output[done - 1] != old_last[row]):
                rewrite.append((row, count))  # new, or tokens dropped or regenerated
            elif count == done:
                stay.append((row, count))
                consumed[row], last[row] = done, old_last[row]
            elif count == done + 1:
                extra.append((row, output[count - 1]))
            else:
                rewrite.append((row, count))
        if extra:
            rows = np.concatenate([rows, np.array([row for row, _ in extra], dtype=np.int64)])
            tokens = np.concatenate([tokens, np.array([token for _, token in extra], dtype=np.int64)])
            for row, token in extra:
                consumed[row], last[row] = old_consumed[row] + 1, token
        advanced = rows.shape[0] > 0
        if advanced:
            rewrite += stay  # their newest token must move to the new column too
        for row, count in rewrite:
            consumed[row] = count
            last[row] = outputs[row][count - 1] if count else -1
        self.consumed, self.last = consumed, last
        self.expect = list(map(add, consumed, self.grows))
        self.fresh = {row for row in odd if part[row] and not consumed[row]}
        self.rewrite.clear()
        kept = self.prompt_len[:n] + int64s(consumed)
        longest = int(kept[part].max(initial=0))
        return Settled(rows, tokens, rewrite, advanced, longest)


def _ends(outputs: list[list[int]], odd: set[int]) -> tuple[list[int], list[int], list[int]]:
    """Every row's output length, newest and next-to-newest token, in C-level passes; the ``odd``
    rows, whose outputs may hold fewer than two tokens, read as idle rows meanwhile."""
    held = [(row, outputs[row]) for row in odd]
    for row, _ in held:
        outputs[row] = _IDLE_OUTPUT
    try:
        return list(map(len, outputs)), list(map(_LAST, outputs)), list(map(_BEFORE_LAST, outputs))
    finally:
        for row, output in held:
            outputs[row] = output
