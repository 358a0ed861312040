"""Distinct ``gov_*`` settings in use by the Governor processor, parsed once per distinct config.

Requests under one preset send identical ``extra_args``, so a batch of a thousand rows holds a
handful of configs. Everything derived from a config (DRY's penalty by match length, the n-gram
need and reach, the penalty as float32 bits, breaker and exempt token sets) is computed here once,
when the first request carrying it is added, and looked up by the config's index afterwards: per
token on the host through numpy arrays indexed by config, per cell on the device through table
rows (see ``shared_history``). Nothing here runs per row per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import NamedTuple

import numpy as np

from governor.processors.cells import EMPTY, NEVER, OUTSIDE_BASE, UNBOUNDED
from governor.processors.dry import MAX_MATCH_LENGTH, penalty_scale
from governor.processors.extra_args import (
    DRYConfig,
    NGramConfig,
    RepPenaltyConfig,
    parse_dry,
    parse_ngram,
    parse_rep_penalty,
)
from governor.processors.ngram import ngram_need, ngram_reach

# Per cell, the select plane holds 8 * config + these flags; each table has a row per select value.
DRY_ALIVE, NGRAM_ALIVE, PENALTY_ALIVE = 1, 2, 4
FLAGS = 8
# A DRY breaker in the history gets a key of its own (BREAK_BASE - serial): it matches nothing, not
# even another breaker, so the newest token can be compared against the history as stored.
BREAK_BASE = -(1 << 40)
ONE_BITS = int(np.float32(1.0).view(np.uint32))
_OUTSIDE_CLAMP = (1 << 31) + OUTSIDE_BASE - 1
_VALUE = itemgetter(1)
_CACHE_LIMIT = 256  # distinct argument sets cached before the unused ones are dropped
# Per config index: what the per-token encoding reads (dtype, value for an unused index).
_ARRAYS: dict[str, tuple[type, int]] = {
    "dry_on": (bool, 0), "ngram_on": (bool, 0), "penalty_on": (bool, 0), "dry_prompt": (bool, 0),
    "penalty_prompt": (bool, 0), "breakers": (np.int64, 0), "exempt": (np.int64, 0), "q_bits": (np.int64, ONE_BITS),
}  # fmt: skip


class Aggregates(NamedTuple):
    """Over the configs in use: whether any uses each control, and the extremes of their windows."""

    dry: bool
    widest_range: int
    narrowest_range: int
    ngram: bool
    widest_reach: int
    narrowest_reach: int
    ngram_need: int  # the largest n - 1
    penalty: bool
    widest_window: int
    narrowest_window: int
    shortest_allowed: int = 1  # DRY's smallest allowed length: shorter matches have no penalty


@dataclass(slots=True, eq=False)
class RequestConfig:
    """One distinct combination of ``gov_*`` settings, shared by every request that sends it."""

    index: int  # its block of FLAGS rows in the device tables and its slot in the numpy arrays
    dry: DRYConfig | None
    ngram: NGramConfig | None
    penalty: RepPenaltyConfig | None
    rows: int = 0  # batch rows using it now

    @property
    def keeps_prompt(self) -> bool:
        """Whether any of its controls looks at the prompt (then the prompt goes into the history)."""
        return bool((self.dry and self.dry.include_prompt) or (self.penalty and self.penalty.include_prompt))


def _penalty_bits(penalty: float) -> int:
    # The per-processor penalty computes alive * (p - 1) + 1 in float32; the same rounding here.
    one = np.float32(1.0)
    value = (np.float32(penalty) - one) + one
    return int(np.float32(value).view(np.uint32))


class TokenSetTable:
    """Distinct token-id sets (DRY breakers, penalty exemptions) as rows of a host bool table; row 0 is empty."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.table = np.zeros((4, vocab_size), dtype=bool)
        self._ids: dict[frozenset[int], int] = {frozenset(): 0}
        self._refs = [1 << 62, 0, 0, 0]
        self._free: list[int] = [3, 2, 1]

    def acquire(self, tokens: frozenset[int]) -> int:
        index = self._ids.get(tokens)
        if index is None:
            if not self._free:
                have = self.table.shape[0]
                self.table = np.concatenate([self.table, np.zeros_like(self.table)])
                self._refs += [0] * have
                self._free = list(range(2 * have - 1, have - 1, -1))
            index = self._free.pop()
            self.table[index] = False
            self.table[index, [t for t in tokens if t < self.vocab_size]] = True
            self._ids[tokens] = index
        self._refs[index] += 1
        return index

    def release(self, index: int) -> None:
        self._refs[index] -= 1
        if not self._refs[index]:
            self._ids = {k: v for k, v in self._ids.items() if v != index}
            self._free.append(index)


class RequestConfigs:
    """The configs in use: a parse cache keyed by the raw arguments, an index per config, and numpy
    arrays by index that the per-token encoding reads."""

    dry_on: np.ndarray
    ngram_on: np.ndarray
    penalty_on: np.ndarray
    dry_prompt: np.ndarray
    penalty_prompt: np.ndarray
    breakers: np.ndarray  # TokenSetTable row per config
    exempt: np.ndarray
    q_bits: np.ndarray  # the penalty as float32 bits (1.0 when off)

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.sets = TokenSetTable(vocab_size)
        self._cache: dict[tuple[object, ...], RequestConfig | None] = {}
        self.by_index: dict[int, RequestConfig] = {}
        self._free: list[int] = []
        self.dirty: set[int] = set()  # indexes whose device table rows must be written
        self._grow(8)
        self.neutral = self._register(None, None, None)  # index 0: rows without any control
        self.serial = 0  # next breaker key serial
        self._aggregates: Aggregates | None = None

    def _grow(self, size: int) -> None:
        for name, (dtype, fill) in _ARRAYS.items():
            out: np.ndarray = np.full(size, fill, dtype=dtype)
            old = getattr(self, name, None)
            if old is not None:
                out[: old.shape[0]] = old
            setattr(self, name, out)

    # ---- requests -----------------------------------------------------------------------------

    def acquire(self, extra_args: Mapping[str, object] | None) -> RequestConfig | None:
        """The request's config (None when it uses no control); parses only arguments not seen before."""
        if not extra_args:
            return None
        key = _cache_key(extra_args)
        if key is not None and key in self._cache:
            config = self._cache[key]
        else:
            dry, ngram, penalty = parse_dry(extra_args), parse_ngram(extra_args), parse_rep_penalty(extra_args)
            config = self._register(dry, ngram, penalty) if (dry or ngram or penalty) else None
            if key is not None:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._evict()
                self._cache[key] = config
        if config is not None:
            config.rows += 1
            if config.rows == 1:
                self._aggregates = None
        return config

    def release(self, config: RequestConfig) -> None:
        config.rows -= 1
        if not config.rows:
            self._aggregates = None

    def _register(self, dry: DRYConfig | None, ngram: NGramConfig | None, penalty: RepPenaltyConfig | None
                  ) -> RequestConfig:  # fmt: skip
        index = self._free.pop() if self._free else len(self.by_index)
        if index >= self.dry_on.shape[0]:
            self._grow(2 * self.dry_on.shape[0])
        config = RequestConfig(index, dry, ngram, penalty)
        self.by_index[index] = config
        self.dry_on[index], self.ngram_on[index], self.penalty_on[index] = bool(dry), bool(ngram), bool(penalty)
        self.dry_prompt[index] = bool(dry and dry.include_prompt)
        self.penalty_prompt[index] = bool(penalty and penalty.include_prompt)
        self.breakers[index] = self.sets.acquire(dry.breakers) if dry else 0
        self.exempt[index] = self.sets.acquire(penalty.exempt) if penalty else 0
        self.q_bits[index] = _penalty_bits(penalty.penalty) if penalty else ONE_BITS
        self.dirty.add(index)
        return config

    def _evict(self) -> None:
        """Drop cached configs no row uses (their index and token sets are reused)."""
        for key, config in list(self._cache.items()):
            if config is None or config.rows:
                continue
            del self._cache[key]
            del self.by_index[config.index]
            self._free.append(config.index)
            if config.dry:
                self.sets.release(int(self.breakers[config.index]))
            if config.penalty:
                self.sets.release(int(self.exempt[config.index]))
            self.dirty.discard(config.index)

    # ---- what the batch needs, over the configs in use -------------------------------------------

    def aggregates(self) -> Aggregates:
        """What the configs in use need from a step (recomputed only when the set in use changes)."""
        if self._aggregates is None:
            used = [c for c in self.by_index.values() if c.rows]
            ranges = [min(c.dry.range or UNBOUNDED, UNBOUNDED) for c in used if c.dry]
            reaches = [ngram_reach(c.ngram) for c in used if c.ngram]
            windows = [min(c.penalty.window or UNBOUNDED, UNBOUNDED) for c in used if c.penalty]
            self._aggregates = Aggregates(
                bool(ranges), max(ranges, default=0), min(ranges, default=UNBOUNDED),
                bool(reaches), max(reaches, default=0), min(reaches, default=UNBOUNDED),
                max((ngram_need(c.ngram) for c in used if c.ngram), default=0),
                bool(windows), max(windows, default=0), min(windows, default=UNBOUNDED),
                min((c.dry.allowed_length for c in used if c.dry), default=1),
            )  # fmt: skip
        return self._aggregates

    @property
    def capacity(self) -> int:
        """Config indexes the numpy arrays (and so the device tables) have room for."""
        return int(self.dry_on.shape[0])

    # ---- per-token encoding (host, vectorised) ----------------------------------------------------

    def encode(self, tokens: np.ndarray, configs: np.ndarray, in_prompt: np.ndarray | None, out: np.ndarray) -> None:
        """The five written planes (see ``shared_history``) of each token, into ``out[5, len(tokens)]``.

        ``configs`` is each token's config index; ``in_prompt`` marks prompt tokens (None: all output).
        """
        inside = tokens < self.vocab_size
        clipped = np.where(inside, tokens, 0)
        keys = np.where(inside, tokens, OUTSIDE_BASE - np.minimum(tokens - self.vocab_size, _OUTSIDE_CLAMP))
        breaker = self.sets.table[self.breakers[configs], clipped] & inside
        exempt = self.sets.table[self.exempt[configs], clipped]
        dry, ngram, penalty = self.dry_on[configs], self.ngram_on[configs], self.penalty_on[configs]
        if in_prompt is not None:
            dry = dry & (~in_prompt | self.dry_prompt[configs])
            ngram = ngram & ~in_prompt
            penalty = penalty & (~in_prompt | self.penalty_prompt[configs])
        serials = BREAK_BASE - self.serial - np.arange(tokens.shape[0])
        self.serial += tokens.shape[0]
        out[0] = np.where(dry, np.where(breaker, serials, keys), EMPTY)
        out[1] = np.where(ngram, keys, EMPTY)
        out[2] = clipped
        dry_alive = dry & inside & ~breaker
        penalty_alive = penalty & inside & ~exempt
        out[3] = FLAGS * configs + dry_alive * DRY_ALIVE + (ngram & inside) * NGRAM_ALIVE
        out[3] += penalty_alive * PENALTY_ALIVE
        out[4] = np.where(penalty_alive, self.q_bits[configs], ONE_BITS)

    # ---- device table rows ----------------------------------------------------------------------

    def table_rows(self, index: int, columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The config's FLAGS rows of the match tables [2, FLAGS, 2 * columns + 1] (DRY penalty, n-gram
        ban), the penalty table [FLAGS, columns] and the info table [FLAGS, 2] (DRY range, n-gram reach).

        Match table column j holds the value for a match of length ``columns - j`` (see
        ``SharedHistory.penalize``); lengths below 0 (cut by DRY's range) have no penalty.
        """
        config = self.by_index[index]
        length = columns - np.arange(2 * columns + 1)
        flags = np.arange(FLAGS)
        match = np.zeros((2, FLAGS, length.shape[0]), dtype=np.float32)
        match[1] = np.inf
        if config.dry:
            scale = np.array(penalty_scale(config.dry), dtype=np.float32)
            row = np.where(length < 0, np.float32(0), scale[np.clip(length, 0, MAX_MATCH_LENGTH)])
            match[0, (flags & DRY_ALIVE) > 0] = row
        if config.ngram:
            match[1, (flags & NGRAM_ALIVE) > 0] = np.where(length >= ngram_need(config.ngram), -np.inf, np.inf)
        q = np.ones((FLAGS, columns), dtype=np.float32)
        if config.penalty:
            value = np.uint32(self.q_bits[index]).view(np.float32)
            window = min(config.penalty.window or UNBOUNDED, UNBOUNDED)
            q[(flags & PENALTY_ALIVE) > 0] = np.where(np.arange(columns) < window, value, np.float32(1))
        dry_range = min(config.dry.range or UNBOUNDED, UNBOUNDED) if config.dry else UNBOUNDED
        reach = ngram_reach(config.ngram) if config.ngram else UNBOUNDED
        info = np.tile(np.array([dry_range, reach], dtype=np.int64), (FLAGS, 1))
        return match, q, info


def _cache_key(args: Mapping[str, object]) -> tuple[object, ...] | None:
    """The arguments as a dict key, built with C-level calls only (it runs for every request added).

    Every argument counts (other keys only make more distinct entries), and so does each value's
    type: 1, 1.0 and True hash alike but do not parse alike.
    """
    items = tuple(sorted(args.items()))
    key = (items, tuple(map(type, map(_VALUE, items))))
    try:
        hash(key)
    except TypeError:  # a list where a scalar belongs: parsing rejects it with the right message
        return None
    return key


def comparable(keys: np.ndarray) -> np.ndarray:
    """Keys as the suffix side of a match: an empty cell matches nothing."""
    return np.where(keys == EMPTY, NEVER, keys)
