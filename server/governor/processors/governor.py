"""The Governor logits processor: DRY, the no-repeat n-gram ban and the windowed repetition penalty
in one vLLM v1 processor, with one token history and one step.

It reads every ``gov_*`` argument (``extra_args``) and gives exactly the logits of the three
per-control processors (``dry``, ``ngram``, ``window_penalty``) applied in the order
``engine/flags.py`` lists them, which tests check bit for bit. What it saves over them:

- one device history instead of three, written once per token (``shared_history``);
- per-request work once per distinct config (``request_configs``), never per row per step;
- rows kept in batch order on the device (moves copy rows), so a step reads slices, and vLLM's
  changes recorded as they come (``batch_rows``), never re-sorted;
- one host-to-device copy per step from buffers allocated once (``uploads``);
- no device-to-host reads: every width and branch is known on the host;
- on CUDA, one fused Triton kernel launch per step (``fused_step``, ``fused_kernel``): it writes the
  uploaded cells, updates the match state and lowers the logits, as the torch ops below do; a
  second launch only on steps that move rows or bring new configs. The torch path serves CPU engines.

A steady step (every row gained one token) is a few C-level passes over vLLM's output lists, a
dozen numpy calls and, for ``balanced``, 12 tensor ops (on CUDA one kernel) whatever the batch size;
a step where the batch changed adds a fixed handful (``change_upload``) plus Python work per row
changed. On CPU, DRY without the ban passes over every cell only to update the matches and lowers
just the cells with a long enough match (``SharedHistory._penalize_matched``).
"""

from __future__ import annotations

from operator import add, itemgetter
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from governor.processors.base import vocab_size_of
from governor.processors.batch_rows import BatchRows, Request
from governor.processors.change_upload import send_change
from governor.processors.dry import MAX_MATCH_LENGTH
from governor.processors.extra_args import parse_dry, parse_ngram, parse_rep_penalty
from governor.processors.fused_step import FusedSteps
from governor.processors.request_configs import RequestConfigs
from governor.processors.shared_history import WRITTEN, SharedHistory, Widths
from governor.processors.slots import limits_of
from governor.processors.uploads import Uploads

if TYPE_CHECKING:
    from vllm.config import VllmConfig

_LAST = itemgetter(-1)
_BEFORE_LAST = itemgetter(-2)
_MIN_ROWS = 8
_MIN_COLUMNS = 64


class GovernorLogitsProcessor(LogitsProcessor):
    """DRY, then the n-gram ban, then the windowed penalty, for every request that asks for any.

    Enabled per request by ``gov_dry_multiplier`` > 0, ``gov_ngram_size`` > 0 or ``gov_rep_penalty``
    > 1 in ``SamplingParams.extra_args``; a batch where nobody does costs one dict check.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.device = torch.device(device)
        self.vocab_size = vocab_size_of(vllm_config)
        self.max_rows, self.max_len = limits_of(vllm_config)
        self.configs = RequestConfigs(self.vocab_size)
        self.batch = BatchRows(self.configs)
        self.history = SharedHistory(self.device, self.vocab_size)
        self.uploads = Uploads(self.device, is_pin_memory)
        self.longest = 0  # longest history (kept prompt + settled output) among the rows
        self._extent = 0  # the same for what the device holds: the columns a realignment keeps
        self._table_configs = 0  # configs the device tables have room for
        self._widths = Widths()
        # The fused kernels on CUDA (compiled here, at engine start; vLLM hands float32 logits).
        self.fused = FusedSteps(self.device) if self.device.type == "cuda" else None
        if self.fused is not None:
            self.fused.warm_up(torch.float32)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``gov_*`` values before the request reaches the engine."""
        args = sampling_params.extra_args
        parse_dry(args), parse_ngram(args), parse_rep_penalty(args)

    def is_argmax_invariant(self) -> bool:
        """Every control can change the most likely token."""
        return False

    @property
    def rows(self) -> dict[int, Request]:
        """The participating requests by batch row."""
        return self.batch.requests

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Record vLLM's changes in its order (removed, added, moved); the device work waits for apply."""
        if batch_update is None:
            return
        batch = self.batch
        for row in batch_update.removed:
            batch.remove(row)
        for row, params, prompt_ids, output_ids in batch_update.added:
            batch.add(row, self.configs.acquire(params.extra_args), prompt_ids, output_ids)
        for a, b, direction in batch_update.moved:
            batch.move(a, b, direction == MoveDirectionality.SWAP)
        batch.fit()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Fold the step's new tokens into the history, then lower the logits of the rows that asked."""
        if not self.batch.requests:
            return logits
        if not self._steady_step(logits.dtype):
            self._change_step(logits.dtype)
        if self.fused is not None:
            self.fused.apply(logits, self.history, self.batch.count, self._widths)
        else:
            self.history.penalize(logits, self.batch.count, self._widths)
        return logits

    # ---- steps ------------------------------------------------------------------------------------

    def _steady_step(self, dtype: torch.dtype) -> bool:
        """Every row gained exactly one settled token and the batch did not change: C-level list
        passes, numpy for the new column, one copy into the history and the match update."""
        batch, history = self.batch, self.history
        if batch.changed or history.table_dtype != dtype or history.now + 1 >= history.columns:
            return False
        outputs = batch.outputs
        lengths = list(map(len, outputs))
        if lengths != batch.expect:
            return False
        newest = list(map(_LAST, outputs))
        if batch.fresh:  # the step after requests arrived: their output holds one token
            before = [output[-2] if length > 1 else -1 for output, length in zip(outputs, lengths, strict=True)]
        else:
            before = list(map(_BEFORE_LAST, outputs))
        if min(newest) < 0 or before != batch.last:
            return False
        n = batch.count
        column = self.uploads.host(WRITTEN * n).reshape(WRITTEN, n)
        self.configs.encode(np.array(newest, dtype=np.int64), batch.config[:n], None, column)
        history.now += 1
        if self.fused is not None:
            self.fused.steady(self.uploads.stage(WRITTEN * n), n)
        else:
            self.uploads.copy_to(history.newest_column(n))
        batch.consumed, batch.last, batch.expect = lengths, newest, list(map(add, lengths, batch.grows))
        batch.fresh.clear()
        self.longest += 1
        self._extent = self.longest
        self._widths = self._current_widths()
        if self.fused is None:
            history.advance(n, self._widths, steady=True)
        return True

    def _change_step(self, dtype: torch.dtype) -> None:
        """Anything else: moves, new rows, dropped tokens, placeholders, the history running out of columns."""
        batch, history, configs = self.batch, self.history, self.configs
        moves = batch.take_moves()
        blanks = batch.take_blanks()
        step = batch.settle()
        blanks += [row for row, _ in step.rewrite]
        self.longest = step.longest
        self._widths = widths = self._current_widths()
        looks = self._looks()
        now = history.now + step.advanced
        columns, rows = history.columns, self._rows_for(batch.count)
        # An empty column left of the longest row (where match updates start), the lookback of a
        # match rebuild left of that, and the new column inside the history.
        if now >= columns or now < self.longest + max(max(looks) - 1, 0):
            target = self.longest + max(*looks, 1)
            columns = max(columns, 2 * (target + 2), _MIN_COLUMNS)
            keep = min(history.now + 1, self._extent + 1, self.longest + 1)
            history.reshape(rows, columns, target - now, keep)
        elif rows > history.rows:
            history.reshape(rows, columns, 0, history.now + 1)
        history.now += step.advanced
        if columns > history.table_columns or dtype != history.table_dtype or configs.capacity != self._table_configs:
            history.reset_tables(configs.capacity, dtype, max(columns, 2 * history.table_columns))
            self._table_configs = configs.capacity
            configs.dirty.update(configs.by_index)
        tables = sorted(configs.dirty)
        configs.dirty.clear()
        send = send_change if self.fused is None else self.fused.change
        send(history, self.uploads, configs, batch, step, moves, blanks, tables, widths, looks)
        self._extent = self.longest

    # ---- host-known sizes ---------------------------------------------------------------------------

    def _current_widths(self) -> Widths:
        """The cells each part of the step covers, from the configs in use and the longest history."""
        needs, longest = self.configs.aggregates(), self.longest
        dry = min(longest, needs.widest_range) if needs.dry else 0
        ngram = max(0, min(longest, needs.widest_reach)) if needs.ngram else 0
        targets = max(dry - 1, ngram)
        penalty = min(longest, needs.widest_window) if needs.penalty else 0
        return Widths(
            dry, ngram, targets, penalty,
            dry_cut=needs.dry and needs.narrowest_range < targets + MAX_MATCH_LENGTH,
            ngram_cut=needs.ngram and needs.narrowest_reach < targets,
            penalty_cut=needs.penalty and needs.narrowest_window < penalty,
            dry_shortest=needs.shortest_allowed,
        )  # fmt: skip

    def _looks(self) -> tuple[int, int]:
        """How far back a rebuilt match is measured, for DRY and for the ban: as far as any reader tells
        apart. Fixed while the configs are (the history keeps that many columns free on the left), except
        for n-grams longer than any history, which could not match further back than it reaches."""
        needs = self.configs.aggregates()
        ngram = min(needs.ngram_need, max(self.longest, MAX_MATCH_LENGTH)) if needs.ngram else 0
        return (MAX_MATCH_LENGTH if needs.dry else 0), ngram

    def _rows_for(self, count: int) -> int:
        have = self.history.rows
        if count <= have:
            return have
        rows = max(count, _MIN_ROWS, 2 * have)
        return max(count, min(rows, self.max_rows)) if self.max_rows else rows
