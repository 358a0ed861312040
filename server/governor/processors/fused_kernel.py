"""The Governor processor's step as Triton kernels, for CUDA engines (imported only there, or by tests).

``step_kernel`` is the one launch of every step, one program per batch row: it writes the step's
cells into the row's history (on a steady step one column from the upload; on a change step the
row's moved copy, blank, appended or rewritten cells), folds the newest token into the match
state (or rebuilds it for rewritten rows), then applies DRY with the n-gram ban and then the
windowed penalty to the row's logits, as ``SharedHistory.advance/rebuild/penalize`` do on the torch
path (that is the specification; tests compare them). ``change_kernel`` runs before it only on
steps that move rows or bring new configs: it copies moved rows aside (so a swap reads both rows
before either is written) and writes the new configs' table rows, which every row reads.

How the results stay those of the torch path:
- each lowering is a min over a token's cells, so a row gathers every cell's value into scratch
  before storing any (block loops over any width: an unbounded range is just more blocks), then
  stores the min per distinct token one block at a time (duplicates found pairwise in the block,
  NaN propagated as ``scatter_reduce(amin)`` and ``torch.minimum`` do);
- arithmetic in float32 rounded to the logits' dtype after each op, with IEEE division
  (``div_rn``: Triton's ``/`` is approximate on CUDA);
- every size, position and switch is a runtime argument, never specialised on: one compile per
  logits dtype, done at engine start (``FusedSteps.warm_up``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from governor.processors.cells import EMPTY, NEVER
from governor.processors.request_configs import ONE_BITS
from governor.processors.shared_history import (
    DRY_KEY,
    DRY_MATCH,
    INDEX,
    NGRAM_KEY,
    NGRAM_MATCH,
    PENALTY,
    PLANES,
    SELECT,
    WRITTEN,
)

# Per-row flags of a change step (the first row of the step's descriptor).
BLANK_ROW, REBUILD_ROW = 1, 2

_EMPTY = tl.constexpr(EMPTY)
_NEVER = tl.constexpr(NEVER)
_ONE_BITS = tl.constexpr(ONE_BITS)
_PLANES = tl.constexpr(PLANES)
_WRITTEN = tl.constexpr(WRITTEN)
_DRY_KEY, _NGRAM_KEY = tl.constexpr(DRY_KEY), tl.constexpr(NGRAM_KEY)
_DRY_MATCH, _NGRAM_MATCH = tl.constexpr(DRY_MATCH), tl.constexpr(NGRAM_MATCH)
_INDEX, _SELECT, _PENALTY = tl.constexpr(INDEX), tl.constexpr(SELECT), tl.constexpr(PENALTY)
_BLANK_ROW, _REBUILD_ROW = tl.constexpr(BLANK_ROW), tl.constexpr(REBUILD_ROW)

_STEP_INTS = ["R", "C", "stride", "G", "steady", "M", "T", "wide", "logits_stride", "L", "S", "now", "n",
              "advanced", "dry", "ngram", "targets", "penalty", "dry_cut", "ngram_cut", "penalty_cut",
              "look_dry", "look_ngram"]  # fmt: skip
_STEP_POINTERS = ["state", "values", "desc", "moved", "match", "q_table", "info", "logits", "scratch"]
_CHANGE_INTS = ["R", "C", "M", "moves", "table_rows", "T", "wide"]
_CHANGE_POINTERS = ["state", "moved", "sources", "tables", "match_in", "q_in", "info_in", "match", "q_table", "info"]


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """Float32 ``x`` rounded to ``dtype`` to nearest even (as torch rounds), kept as float32. bf16 is
    rounded by hand: Triton's interpreter truncates there, so the checks on CPU would not see CUDA's."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        nearest = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(x != x, x, nearest.to(tl.float32, bitcast=True))
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _copy(source, target, count, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for first in range(0, count, BLOCK):
        at = first + lanes
        inside = at < count
        tl.store(target + at, tl.load(source + at, mask=inside), mask=inside)


@triton.jit
def _fill(target, value, count, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for first in range(0, count, BLOCK):
        at = first + lanes
        tl.store(target + at, tl.zeros([BLOCK], dtype=tl.int64) + value, mask=at < count)


@triton.jit
def _advance(key, match, now, C, width, BLOCK: tl.constexpr):
    """Cells whose key differs from the newest restart their match (``SharedHistory.advance``)."""
    newest = tl.load(key + now)
    lanes = tl.arange(0, BLOCK)
    for first in range(0, width, BLOCK):
        j = first + lanes
        inside = j < width
        differs = tl.load(key + now - width + j, mask=inside, other=0) != newest
        tl.store(match + C - width + j, tl.zeros([BLOCK], dtype=tl.int64) + now + 1, mask=inside & differs)


@triton.jit
def _rebuild(key, match, now, C, width, look, BLOCK: tl.constexpr):
    """Match state over ``width`` cells measured up to ``look`` tokens back (``SharedHistory.rebuild``):
    cell j compares the ``look`` keys ending at it with the row's last ``look`` keys, BLOCK at a time."""
    lanes = tl.arange(0, BLOCK)
    for first in range(0, width, BLOCK):
        j = first + lanes
        inside = j < width
        last = tl.zeros([BLOCK], dtype=tl.int64)  # 1 + the offset of the last difference, 0: none
        for offset in range(0, look, BLOCK):
            m = offset + lanes
            within = m < look
            suffix = tl.load(key + now - look + 1 + m, mask=within, other=0)
            suffix = tl.where(suffix == _EMPTY, _NEVER, suffix)
            both = inside[:, None] & within[None, :]
            earlier = tl.load(key + now - width - look + 1 + j[:, None] + m[None, :], mask=both, other=0)
            differs = both & (earlier != suffix[None, :])
            last = tl.maximum(last, tl.max(tl.where(differs, m[None, :] + 1, 0), axis=1))
        tl.store(match + C - width + j, last + now + 1 - look, mask=inside)


@triton.jit
def _store_min(index_row, first_column, width, scratch_row, logits_row, L, BLOCK: tl.constexpr):
    """logits[index[j]] = min(itself, scratch[j]) for the ``width`` cells from ``first_column``; a block's
    duplicates reduced among themselves first, so each address is stored once per block."""
    lanes = tl.arange(0, BLOCK)
    dtype = logits_row.dtype.element_ty
    for first in range(0, width, BLOCK):
        j = first + lanes
        inside = j < width
        index = tl.load(index_row + first_column + j, mask=inside, other=0)
        valid = inside & (index < L)
        value = tl.load(scratch_row + j, mask=inside, other=float("inf"))
        same = (index[:, None] == index[None, :]) & valid[:, None] & valid[None, :]
        lowest = tl.min(tl.where(same, value[None, :], float("inf")), axis=1)
        # A NaN among a token's values wins, as in scatter_reduce(amin): their sum is NaN exactly then.
        nan = tl.sum(tl.where(same & (value != value)[None, :], value[None, :], 0.0), axis=1)
        lowest = tl.where(nan != nan, nan, lowest)
        earlier = tl.max(tl.where(same & (lanes[None, :] < lanes[:, None]), 1, 0), axis=1) > 0
        mine = valid & (earlier == 0)
        current = tl.load(logits_row + index, mask=mine, other=0.0).to(tl.float32)
        tl.store(logits_row + index, _min_nan(current, lowest).to(dtype), mask=mine)
        tl.debug_barrier()  # the next block may store to an address this one did


@triton.jit
def _penalize(row, plane, C, match, q_table, info, T, wide, logits_row, L, scratch_row, now,
              dry, ngram, targets, penalty, dry_cut, ngram_cut, penalty_cut, BLOCK: tl.constexpr):  # fmt: skip
    """DRY and the ban (one min), then the windowed penalty on what they left (``SharedHistory.penalize``)."""
    lanes = tl.arange(0, BLOCK)
    dtype = logits_row.dtype.element_ty
    index_row = row + _INDEX * plane
    select_row = row + _SELECT * plane
    chosen = tl.load(select_row + now)
    table_width = 2 * wide + 1
    width = targets
    if (width > 0) & ((dry > 0) | (ngram > 0)):
        dry_reach = tl.load(info + 2 * chosen)
        ngram_reach = tl.load(info + 2 * chosen + 1)
        first_column = now - width + 1
        for first in range(0, width, BLOCK):
            j = first + lanes
            inside = j < width
            index = tl.load(index_row + first_column + j, mask=inside, other=0)
            valid = inside & (index < L)
            select = tl.load(select_row + first_column + j, mask=inside, other=0)
            # Table column wide - now - 1 + state holds the value for a match of length now + 1 - state.
            table = match + select * table_width + wide - now - 1
            value = tl.zeros([BLOCK], dtype=tl.float32) + float("inf")
            if dry > 0:
                x = tl.load(logits_row + index, mask=valid, other=0.0).to(tl.float32)
                start = tl.load(row + _DRY_MATCH * plane + C - width + j, mask=inside, other=0)
                if dry_cut != 0:
                    start = tl.maximum(start, now + width + 1 - j - dry_reach)
                scale = tl.load(table + start, mask=inside, other=0.0).to(tl.float32)
                value = _rounded(x - scale, dtype)
            if ngram > 0:
                state = tl.load(row + _NGRAM_MATCH * plane + C - width + j, mask=inside, other=0)
                ban = tl.load(table + T * table_width + state, mask=inside, other=float("inf")).to(tl.float32)
                if ngram_cut != 0:
                    ban = tl.where(width - j > ngram_reach, float("inf"), ban)
                value = _min_nan(value, ban)
            tl.store(scratch_row + j, tl.where(valid, value, float("inf")), mask=inside)
        tl.debug_barrier()  # every value gathered before any logit changes
        _store_min(index_row, first_column, width, scratch_row, logits_row, L, BLOCK)
    width = penalty
    if width > 0:
        first_column = now - width + 1
        for first in range(0, width, BLOCK):
            j = first + lanes
            inside = j < width
            index = tl.load(index_row + first_column + j, mask=inside, other=0)
            valid = inside & (index < L)
            if penalty_cut != 0:
                select = tl.load(select_row + first_column + j, mask=inside, other=0)
                q = tl.load(q_table + select * wide + width - 1 - j, mask=inside, other=1.0).to(tl.float32)
            else:
                bits = tl.load(row + _PENALTY * plane + first_column + j, mask=inside, other=_ONE_BITS)
                q = _rounded(bits.to(tl.int32).to(tl.float32, bitcast=True), dtype)
            x = tl.load(logits_row + index, mask=valid, other=0.0).to(tl.float32)
            # With penalty >= 1, min(x / p, x * p) is x / p for positive x and x * p for negative x.
            lowered = _rounded(tl.math.div_rn(x, q), dtype)
            value = _min_nan(lowered, _rounded(x * q, dtype))
            tl.store(scratch_row + j, tl.where(valid, value, float("inf")), mask=inside)
        tl.debug_barrier()
        _store_min(index_row, first_column, width, scratch_row, logits_row, L, BLOCK)


@triton.jit(do_not_specialize=_STEP_INTS, do_not_specialize_on_alignment=_STEP_POINTERS)
def step_kernel(state, R, C, values, stride, desc, G, steady, moved, M, match, q_table, info, T, wide,
                logits, logits_stride, L, scratch, S, now, n, advanced, dry, ngram, targets, penalty,
                dry_cut, ngram_cut, penalty_cut, look_dry, look_ngram, BLOCK: tl.constexpr,
                COPY: tl.constexpr):  # fmt: skip
    """One row per program: its cells, its match state, its logits (see the module docstring).

    ``desc[4, G]`` (change steps): per row, flags, the moved copy's slot or -1, and where its cells
    start in ``values[WRITTEN, stride]`` and how many there are (they end at ``now``). A steady step
    has no descriptor: row r's one cell is ``values[:, r]`` at ``now``.
    """
    r = tl.program_id(0).to(tl.int64)
    plane = R * C
    row = state + r * C
    flags = r * 0
    start = r
    count = r * 0 + 1
    if steady == 0:
        flags = tl.load(desc + r)
        slot = tl.load(desc + G + r)
        start = tl.load(desc + 2 * G + r)
        count = tl.load(desc + 3 * G + r)
        if slot >= 0:
            for p in tl.static_range(_PLANES):
                _copy(moved + p * M * C + slot * C, row + p * plane, C, COPY)
        if (flags & _BLANK_ROW) != 0:
            tl.debug_barrier()
            # The blank cell of shared_history: (EMPTY, EMPTY, 0, 0, ONE_BITS, 0, 0).
            _fill(row + _DRY_KEY * plane, _EMPTY, C, COPY)
            _fill(row + _NGRAM_KEY * plane, _EMPTY, C, COPY)
            _fill(row + _INDEX * plane, 0, C, COPY)
            _fill(row + _SELECT * plane, 0, C, COPY)
            _fill(row + _PENALTY * plane, _ONE_BITS, C, COPY)
            _fill(row + _DRY_MATCH * plane, 0, C, COPY)
            _fill(row + _NGRAM_MATCH * plane, 0, C, COPY)
    tl.debug_barrier()
    lanes = tl.arange(0, BLOCK)
    for first in range(0, count, BLOCK):
        k = first + lanes
        inside = k < count
        for p in tl.static_range(_WRITTEN):
            cell = tl.load(values + p * stride + start + k, mask=inside)
            tl.store(row + p * plane + now + 1 - count + k, cell, mask=inside)
    tl.debug_barrier()
    if advanced != 0:
        _advance(row + _DRY_KEY * plane, row + _DRY_MATCH * plane, now, C, dry, BLOCK)
        _advance(row + _NGRAM_KEY * plane, row + _NGRAM_MATCH * plane, now, C, ngram, BLOCK)
    if (flags & _REBUILD_ROW) != 0:
        tl.debug_barrier()
        if (dry > 0) & (look_dry > 0):
            _rebuild(row + _DRY_KEY * plane, row + _DRY_MATCH * plane, now, C, dry, look_dry, BLOCK)
        if (ngram > 0) & (look_ngram > 0):
            _rebuild(row + _NGRAM_KEY * plane, row + _NGRAM_MATCH * plane, now, C, ngram, look_ngram, BLOCK)
    tl.debug_barrier()
    if r < n:
        _penalize(row, plane, C, match, q_table, info, T, wide, logits + r * logits_stride, L, scratch + r * S,
                  now, dry, ngram, targets, penalty, dry_cut, ngram_cut, penalty_cut, BLOCK)  # fmt: skip


@triton.jit(do_not_specialize=_CHANGE_INTS, do_not_specialize_on_alignment=_CHANGE_POINTERS)
def change_kernel(state, R, C, moved, M, sources, moves, tables, table_rows, match_in, q_in, info_in,
                  match, q_table, info, T, wide, COPY: tl.constexpr):  # fmt: skip
    """Program i copies moved row ``sources[i]`` aside into ``moved[:, i]`` and writes table row
    ``tables[i]`` from the upload (``match_in[2, table_rows, 2 * wide + 1]``, ``q_in``, ``info_in``)."""
    i = tl.program_id(0).to(tl.int64)
    if i < moves:
        source = tl.load(sources + i)
        for p in tl.static_range(_PLANES):
            _copy(state + p * R * C + source * C, moved + p * M * C + i * C, C, COPY)
    if i < table_rows:
        target = tl.load(tables + i)
        lanes = tl.arange(0, COPY)
        table_width = 2 * wide + 1
        dtype = match.dtype.element_ty
        for h in tl.static_range(2):
            for first in range(0, table_width, COPY):
                at = first + lanes
                inside = at < table_width
                value = tl.load(match_in + (h * table_rows + i) * table_width + at, mask=inside)
                tl.store(match + (h * T + target) * table_width + at, _rounded(value, dtype).to(dtype), mask=inside)
        for first in range(0, wide, COPY):
            at = first + lanes
            inside = at < wide
            value = tl.load(q_in + i * wide + at, mask=inside)
            tl.store(q_table + target * wide + at, _rounded(value, dtype).to(dtype), mask=inside)
        for h in tl.static_range(2):
            tl.store(info + 2 * target + h, tl.load(info_in + 2 * i + h))
