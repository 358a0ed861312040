"""The one token history of the Governor processor on the logits device, and the tensor work of a step.

One int64 tensor ``state[PLANES, rows, columns]``. Row i is batch row i: a move copies the device
row (vLLM moves a row or two per finished request), so every per-step read is a slice of the first
``n`` rows, never a gather. Rows are right-aligned as in ``slots.py``: every row's newest token sits
in column ``now``. Per cell, five planes are written once, when the token enters (one strided copy
per steady step, from the host where the request's settings are known):

- ``DRY_KEY``: what DRY matches on: the token id (or an outside-the-vocabulary key), ``EMPTY``
  outside DRY's context, a key of its own for a sequence breaker (matches nothing, see ``BREAK_BASE``);
- ``NGRAM_KEY``: the same for the n-gram ban (output tokens only, breakers are plain tokens);
- ``INDEX``: the logits column to gather from and scatter to (0 where there is none);
- ``SELECT``: ``8 * config + flags``, the cell's row in the lookup tables (flags: DRY, the ban and
  the penalty may lower this token);
- ``PENALTY``: the windowed penalty for this cell as float32 bits (1.0 where it does not apply).

Two more planes hold the match state of DRY and of the n-gram ban, indexed by distance from ``now``
(storage column ``columns - p`` for the cell ``p`` tokens back), so appending a token updates them
in place: a cell whose token equals the newest continues the match the cell before it had at the
previous step, which sits in the same storage column. The state is the match's ``start + p``: it
does not change while the match extends, and resets to ``now + 1`` (length 0) where the token
differs: one comparison and one masked fill per step. The length is ``now + 1 - state``, read
through a table sliced at ``now`` so the lookup needs no arithmetic (see ``penalize``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from governor.processors.cells import EMPTY, scatter_min
from governor.processors.request_configs import FLAGS, ONE_BITS

DRY_KEY, NGRAM_KEY, INDEX, SELECT, PENALTY, DRY_MATCH, NGRAM_MATCH = range(7)
PLANES = 7
WRITTEN = 5  # planes written per token; the match planes are derived on the device
_BLANK = (EMPTY, EMPTY, 0, 0, ONE_BITS, 0, 0)  # a row without history (and a match state in range)
_REBUILD_CELLS = 1 << 22  # cells (rows x width x lookback) one rebuild chunk may touch


@dataclass(slots=True)
class Widths:
    """How many history cells each part of a step covers, known on the host (no device reads)."""

    dry: int = 0  # cells before the newest whose DRY match is kept current (0: no row uses DRY)
    ngram: int = 0  # the same for the n-gram ban
    targets: int = 0  # cells whose token DRY and the ban may lower, ending at the newest
    penalty: int = 0  # cells the windowed penalty covers, ending at the newest
    dry_cut: bool = False  # some row's DRY range is short enough to cut matches among those cells
    ngram_cut: bool = False  # some row's n-gram window is narrower than the cells read
    penalty_cut: bool = False  # some row's penalty window is narrower than the cells read
    dry_shortest: int = 1  # the shortest match any row's DRY penalises (its smallest allowed length)


class SharedHistory:
    """The state tensor, the per-config lookup tables, and the tensor ops of a step."""

    def __init__(self, device: torch.device, vocab_size: int) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.state = torch.zeros((PLANES, 0, 0), dtype=torch.int64, device=device)
        self.blank = torch.tensor(_BLANK, dtype=torch.int64, device=device).view(PLANES, 1, 1)
        self.now = 0
        # Per select value: [DRY penalty, n-gram ban] by match length, the penalty by distance, and
        # (DRY range, n-gram reach) for rows whose windows cut the cells read.
        self.match_tables = torch.zeros((2, 0, 1), dtype=torch.float32, device=device)
        self.q_table = torch.zeros((0, 0), dtype=torch.float32, device=device)
        self.info = torch.zeros((0, 2), dtype=torch.int64, device=device)
        self.descending = torch.zeros(0, dtype=torch.int64, device=device)
        self.table_columns = 0  # the history width the tables serve (>= columns)
        # CPU only: DRY without the ban lowers only the cells with a long enough match, found on the
        # host (``_penalize_matched``), and the match tables are read through a flat index (``_lookup``).
        self.cache_friendly = device.type == "cpu"
        self._steps: dict[int, torch.Tensor] = {}
        self._continuing: tuple[int, np.ndarray] | None = None  # see ``advance``

    @property
    def rows(self) -> int:
        return self.state.shape[1]

    @property
    def columns(self) -> int:
        return self.state.shape[2]

    # ---- shape ------------------------------------------------------------------------------------

    def reshape(self, rows: int, columns: int, shift: int, keep: int) -> None:
        """Grow to ``rows`` x ``columns`` and move the ``keep`` columns ending at ``now`` by ``shift``.

        The match planes keep their storage columns (right-aligned) and their values follow the shift.
        """
        old, have = self.state, self.state.shape[2]
        new = self.blank.expand(PLANES, rows, columns).clone()
        if old.shape[1] and have:
            count = old.shape[1]
            src = self.now - keep + 1
            if keep > 0:
                new[:WRITTEN, :count, src + shift : src + shift + keep] = old[:WRITTEN, :, src : src + keep]
            matches = new[WRITTEN:, :count, columns - have :]
            matches.copy_(old[WRITTEN:])
            if shift:
                matches.add_(shift).clamp_(min=0)
        self.state = new
        self.now += shift

    def reset_tables(self, configs: int, dtype: torch.dtype, columns: int) -> None:
        """Room for ``configs`` configs and histories up to ``columns`` wide (grown by doubling, so a
        realignment rarely needs it); every config's rows must be written again."""
        rows = FLAGS * configs
        self.table_columns = columns
        self.match_tables = torch.zeros((2, rows, 2 * columns + 1), dtype=dtype, device=self.device)
        self.q_table = torch.ones((rows, columns), dtype=dtype, device=self.device)
        self.info = torch.zeros((rows, 2), dtype=torch.int64, device=self.device)
        # descending[i] = 2 * columns + 2 - i: its slices give per-cell distances without arithmetic.
        self.descending = torch.arange(2 * columns + 2, -1, -1, dtype=torch.int64, device=self.device)

    @property
    def table_dtype(self) -> torch.dtype:
        return self.match_tables.dtype

    # ---- writes -----------------------------------------------------------------------------------

    def write_tables(self, rows: torch.Tensor, match: torch.Tensor, q: torch.Tensor, info: torch.Tensor) -> None:
        dtype = self.match_tables.dtype
        self.match_tables[:, rows] = match if match.dtype == dtype else match.to(dtype)
        self.q_table[rows] = q if q.dtype == dtype else q.to(dtype)
        self.info[rows] = info

    def move_rows(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy whole rows (all at once: the sources are read before any target is written)."""
        self.state[:, targets] = self.state[:, sources]

    def blank_rows(self, rows: torch.Tensor) -> None:
        self.state[:, rows] = self.blank

    def write_cells(self, rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor) -> None:
        """The written planes of cells (rows[i], columns[i]) := values[:, i]."""
        self.state[:WRITTEN, rows, columns] = values

    def newest_column(self, n: int) -> torch.Tensor:
        """The written planes of the first ``n`` rows at ``now``: where a steady step's upload lands."""
        return self.state[:WRITTEN, :n, self.now]

    # ---- match state ------------------------------------------------------------------------------

    def advance(self, n: int, widths: Widths, steady: bool = False) -> None:
        """Fold the token just written at ``now`` into the match state of the first ``n`` rows.

        ``steady``: nothing else changes the state before ``penalize`` (a steady step), which may then
        use the DRY cells found continuing a match here (``_continuing``, CPU only).
        """
        now, columns = self.now, self.columns
        self._continuing = None
        for key, match, width in ((DRY_KEY, DRY_MATCH, widths.dry), (NGRAM_KEY, NGRAM_MATCH, widths.ngram)):
            if width > 0:
                keys = self.state[key, :n]
                differs = keys[:, now - width : now] != keys[:, now : now + 1]
                self.state[match, :n, columns - width :].masked_fill_(differs, now + 1)
                if key == DRY_KEY and steady and self.cache_friendly:
                    same = np.logical_not(differs.numpy())
                    self._continuing = (width, np.flatnonzero(same))

    def rebuild(self, rows: torch.Tensor, suffix: torch.Tensor, key: int, width: int) -> None:
        """Match state of ``rows`` (new or rewritten) over the ``width`` cells before ``now``, from scratch.

        ``suffix[i]`` holds row i's last ``look`` keys as compared (``EMPTY`` as ``NEVER``), oldest
        first; matches are measured up to ``look`` tokens, which is all the readers tell apart.
        """
        count, look = suffix.shape
        if width <= 0 or look <= 0 or count == 0:
            return
        now, columns = self.now, self.columns
        steps = self._steps.get(look)
        if steps is None:
            steps = self._steps[look] = torch.arange(1, look + 1, dtype=torch.int64, device=self.device)
        match = DRY_MATCH if key == DRY_KEY else NGRAM_MATCH
        chunk = max(1, _REBUILD_CELLS // (width * look))
        for first in range(0, count, chunk):
            part = rows[first : first + chunk]
            # earlier[i, j, m]: the key (look - 1 - m) tokens before cell now - width + j.
            earlier = self.state[key][part][:, now - width - look + 1 : now].unfold(1, look, 1)
            differs = earlier != suffix[first : first + chunk].unsqueeze(1)
            # The match runs back to the last difference: start + p = now + 1 - length.
            start = (differs * steps).amax(2).add_(now + 1 - look)
            self.state[match][part, columns - width :] = start

    # ---- logits -----------------------------------------------------------------------------------

    def penalize(self, logits: torch.Tensor, n: int, widths: Widths) -> None:
        """DRY, then the n-gram ban, then the windowed penalty, on the first ``n`` rows of ``logits``.

        Each lowers a logit to the min of the values its cells give that token (exact: each control
        only lowers, and every cell of a token gives that token's value or more). DRY's penalty and
        the ban go out in one scatter (min is associative); the penalty reads the logits they left.
        """
        state, now, columns, wide = self.state, self.now, self.columns, self.table_columns
        narrow = logits.shape[1] < self.vocab_size
        width = widths.targets
        if width > 0 and widths.dry and not widths.ngram and self.cache_friendly:
            self._penalize_matched(logits, n, widths, narrow)
        elif width > 0 and (widths.dry or widths.ngram):
            cells = slice(now - width + 1, now + 1)
            index, select = state[INDEX, :n, cells], state[SELECT, :n, cells]
            if narrow:
                index, outside = self._narrowed(index, logits.shape[1])
            # Table column (wide - now - 1 + state) holds the value for length now + 1 - state.
            values = None
            if widths.dry:
                start = state[DRY_MATCH, :n, columns - width :]
                if widths.dry_cut:
                    # Within a range r a match at distance p may reach back r - p tokens: start >= now + 1 + p - r.
                    first = 2 * wide + 1 - now - width
                    reach = self.info[:, 0][state[SELECT, :n, now]]
                    start = torch.maximum(start, self.descending[first : first + width] - reach.unsqueeze(1))
                penalty = self._lookup(0, select, start, wide - now - 1)
                values = logits[:n].gather(1, index).sub_(penalty)
            if widths.ngram:
                ban = self._lookup(1, select, state[NGRAM_MATCH, :n, columns - width :], wide - now - 1)
                if widths.ngram_cut:
                    distance = self.descending[2 * wide + 2 - width : 2 * wide + 2]
                    reach = self.info[:, 1][state[SELECT, :n, now]]
                    ban.masked_fill_(distance > reach.unsqueeze(1), math.inf)
                values = ban if values is None else torch.minimum(values, ban, out=values)
            assert values is not None
            if narrow:
                values.masked_fill_(outside, math.inf)
            logits[:n].scatter_reduce_(1, index, values, "amin")
        width = widths.penalty
        if width > 0:
            cells = slice(now - width + 1, now + 1)
            index = state[INDEX, :n, cells]
            if narrow:
                index, outside = self._narrowed(index, logits.shape[1])
            if widths.penalty_cut:
                distance = self.descending[2 * wide + 3 - width : 2 * wide + 3]
                q = self.q_table[state[SELECT, :n, cells], distance]
            else:
                q = state[PENALTY].view(torch.float32)[:n, 0::2][:, cells]
                if q.dtype != logits.dtype:
                    q = q.to(logits.dtype)
            values = logits[:n].gather(1, index)
            # With penalty >= 1, min(x / p, x * p) is x / p for positive x and x * p for negative x.
            lowered = values / q
            torch.minimum(lowered, values.mul_(q), out=lowered)
            if narrow:
                lowered.masked_fill_(outside, math.inf)
            logits[:n].scatter_reduce_(1, index, lowered, "amin")
        self._continuing = None  # found for this step only

    def _penalize_matched(self, logits: torch.Tensor, n: int, widths: Widths, narrow: bool) -> None:
        """DRY alone, on CPU: the same values on the cells whose match is long enough to be penalised.

        Every other cell's penalty is 0 and lowering a logit by 0 changes nothing, so only the cells
        with a match of at least ``dry_shortest`` tokens (a few in a hundred in text) are looked up,
        gathered and lowered: one comparison and one host pass over the cells instead of six passes.
        Finding them is a read of the device's data on the host: free on CPU; a GPU would wait on it,
        so the fused kernel keeps to the dense passes there.
        """
        state, now, columns, wide, width = self.state, self.now, self.columns, self.table_columns, widths.targets
        start = state[DRY_MATCH, :n, columns - width :]
        # A match's length is now + 1 - start: long enough where start <= now + 1 - dry_shortest.
        # (numpy finds the cells ~3x faster than torch's ``nonzero`` on one thread.) In a steady step
        # only the cells ``advance`` found continuing a match can be (a few in a hundred).
        shortest, continuing, self._continuing = now + 1 - widths.dry_shortest, self._continuing, None
        if continuing is None:
            rows, ats = np.divmod(np.flatnonzero(torch.le(start, shortest).numpy()), width)
            starts = start.numpy()[rows, ats]
        else:  # positions among the last `advanced` match cells, of which `start` holds the last `width`
            advanced, cells = continuing
            rows, ats = np.divmod(cells, advanced)
            ats -= advanced - width
            rows, ats = rows[ats >= 0], ats[ats >= 0]
            starts = start.numpy()[rows, ats]  # numpy indexes these ~1% of cells in half the time torch does
            long_enough = starts <= shortest
            rows, ats, starts = rows[long_enough], ats[long_enough], starts[long_enough]
        row, at, start = torch.from_numpy(rows), torch.from_numpy(ats), torch.from_numpy(starts)
        cell = at + (now - width + 1)
        if widths.dry_cut:  # as in ``penalize``: a match may reach back only ``range - p`` tokens
            reach = self.info[:, 0][state[SELECT, :n, now]]
            start = torch.maximum(start, self.descending[at + (2 * wide + 1 - now - width)] - reach[row])
        penalty = self._lookup(0, state[SELECT][row, cell], start, wide - now - 1)
        index = state[INDEX][row, cell]
        if narrow:
            index, outside = self._narrowed(index, logits.shape[1])
            penalty.masked_fill_(outside, 0)
        scatter_min(logits, row, index.unsqueeze(1), logits[row, index].sub_(penalty).unsqueeze(1))

    def _lookup(self, table: int, select: torch.Tensor, start: torch.Tensor, offset: int) -> torch.Tensor:
        """``match_tables[table, select, offset + start]`` per cell. On CPU as one add and one flat
        ``index_select``: a two-index lookup there costs ~3x as much (4.7 of a 1,024-row step's 18 ms)."""
        if not self.cache_friendly:
            return self.match_tables[table, :, offset:][select, start]
        flat = self.match_tables[table].view(-1)[offset:]
        at = start.add(select, alpha=self.match_tables.shape[2])
        return flat.index_select(0, at.view(-1)).view(at.shape)

    @staticmethod
    def _narrowed(index: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits narrower than the vocabulary (rare): ids past them have nothing to lower."""
        outside = index >= width
        return index.masked_fill(outside, 0), outside
