"""The Governor processor's fused path (CUDA): the host side of ``fused_kernel``.

A steady step uploads the newest column (as the torch path does) into the staging buffer instead of
the history, and ``apply`` launches ``step_kernel`` once: it writes that column, updates the match
state and lowers the logits. A change step encodes what the torch path's ``send_change`` encodes, in
a layout the kernel reads per row (a descriptor per row instead of cell coordinates: a row's cells
are contiguous and end at ``now``; no suffixes: the kernel reads them from the history it just
wrote), sends it in the step's one upload and launches ``change_kernel`` first only when rows moved
or configs are new. Realigning the history and regrowing the tables (every ~longest tokens, and
while sizes still grow) stay the torch ops of ``SharedHistory``.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch

from governor.processors.batch_rows import BatchRows, Settled
from governor.processors.change_upload import _Layout, _put_tables
from governor.processors.launches import Launcher
from governor.processors.request_configs import FLAGS, RequestConfigs
from governor.processors.shared_history import PLANES, WRITTEN, SharedHistory, Widths
from governor.processors.uploads import Uploads

BLOCK = 64  # cells per block of the per-cell loops; a block's duplicates are found pairwise (BLOCK x BLOCK)
COPY = 1024  # values per block of the row copies and table writes
# Per-row flags of a change step's descriptor (fused_kernel's BLANK_ROW and REBUILD_ROW).
BLANK_ROW, REBUILD_ROW = 1, 2


class FusedSteps:
    """The device work of each step as one launch (two on steps that move rows or add configs)."""

    def __init__(self, device: torch.device, launch: Launcher | None = None, block: int = BLOCK) -> None:
        self.device = device
        self.launch = launch or Launcher()
        self.block = block  # a power of two; tests vary it to cross block edges often or to run faster
        # Moved rows set aside by change_kernel, and per-cell values gathered before any logit changes.
        self.moved = torch.zeros((PLANES, 1, 1), dtype=torch.int64, device=device)
        self.scratch = torch.zeros((1, 1), dtype=torch.float32, device=device)
        # What the next step_kernel launch writes (set by steady or change, used by apply).
        self._values = self._desc = self.scratch
        self._stride = self._rows = self._steady = self._advanced = 0
        self._looks = (0, 0)

    def steady(self, staged: torch.Tensor, n: int) -> None:
        """Row r's new cell is ``staged[:, r]`` (``WRITTEN`` planes of ``n``), at the new ``now``."""
        self._values = self._desc = staged
        self._stride = self._rows = n
        self._steady = self._advanced = 1
        self._looks = (0, 0)

    def change(
        self,
        history: SharedHistory,
        uploads: Uploads,
        configs: RequestConfigs,
        batch: BatchRows,
        step: Settled,
        moves: tuple[list[int], list[int]],
        blanks: list[int],
        tables: list[int],
        widths: Widths,
        looks: tuple[int, int],
    ) -> None:
        """``send_change``'s contract (``history.now`` is the new column), sent in one upload; the rows'
        writes happen in the next ``apply``'s launch."""
        columns = history.table_columns  # the tables serve histories this wide
        blanks = [row for row in blanks if row < history.rows]
        rows = max(batch.count, max(blanks) + 1) if blanks else batch.count
        requests = batch.requests
        rewritten = np.array([row for row, _ in step.rewrite], dtype=np.int64)
        segments = [requests[row].prompt + requests[row].output[:count] for row, count in step.rewrite]
        lengths = np.array(list(map(len, segments)), dtype=np.int64)
        appended = step.appended_rows.shape[0]
        cells = appended + int(lengths.sum())
        moved, flag_rows = len(moves[0]), FLAGS * len(tables)
        layout = _Layout()
        for name, count in (("desc", 4 * rows), ("sources", moved), ("values", WRITTEN * cells),
                            ("tables", flag_rows), ("info", 2 * flag_rows)):  # fmt: skip
            layout.add(name, count)
        layout.floats("match", 2 * flag_rows * (2 * columns + 1))
        layout.floats("q", flag_rows * columns)
        host = uploads.host(layout.size)

        desc = layout.host(host, "desc").reshape(4, rows)
        desc[0], desc[1], desc[2:] = 0, -1, 0
        desc[1, moves[1]] = np.arange(moved)
        desc[0, blanks] |= BLANK_ROW
        desc[0, rewritten] |= REBUILD_ROW
        starts = np.cumsum(lengths) - lengths
        desc[2, step.appended_rows] = np.arange(appended)
        desc[3, step.appended_rows] = 1
        desc[2, rewritten] = appended + starts
        desc[3, rewritten] = lengths
        layout.host(host, "sources")[:] = moves[0]
        # Cells: the appended tokens, then each rewritten row's tokens (the kernel puts them at `now`).
        within = np.arange(cells - appended, dtype=np.int64) - np.repeat(starts, lengths)
        cell_rows = np.concatenate([step.appended_rows, np.repeat(rewritten, lengths)])
        tokens = np.fromiter(chain(step.appended_tokens.tolist(), *segments), dtype=np.int64, count=cells)
        prompt_cells = within < np.repeat(batch.prompt_len[rewritten], lengths)
        in_prompt = np.concatenate([np.zeros(appended, dtype=bool), prompt_cells])
        values = layout.host(host, "values").reshape(WRITTEN, cells)
        configs.encode(tokens, batch.config[cell_rows], in_prompt, values)
        _put_tables(configs, tables, columns, layout, host)

        staged = uploads.stage(layout.size)
        if moved or tables:
            if moved > self.moved.shape[1] or self.moved.shape[2] != history.columns:
                shape = (PLANES, max(moved, 2 * self.moved.shape[1]), history.columns)
                self.moved = torch.empty(shape, dtype=torch.int64, device=self.device)
            self.launch(
                "change_kernel", max(moved, flag_rows),
                history.state, history.rows, history.columns, self.moved, self.moved.shape[1],
                layout.device(staged, "sources"), moved, layout.device(staged, "tables"), flag_rows,
                layout.device(staged, "match").view(torch.float32), layout.device(staged, "q").view(torch.float32),
                layout.device(staged, "info"), history.match_tables, history.q_table, history.info,
                history.match_tables.shape[1], columns, COPY=COPY,
            )  # fmt: skip
        self._values, self._desc = layout.device(staged, "values"), layout.device(staged, "desc")
        self._stride, self._rows, self._steady, self._advanced = cells, rows, 0, int(step.advanced)
        self._looks = looks if rewritten.shape[0] else (0, 0)

    def warm_up(self, dtype: torch.dtype) -> None:
        """Compile both kernels for ``dtype`` logits (at engine start: no step waits for a compile), by
        running them on a one-row throwaway history; every size is a runtime argument, so these are the
        only compiles."""
        history = SharedHistory(self.device, 1)
        history.reshape(1, 8, 0, 0)
        history.reset_tables(1, dtype, 8)
        empty = torch.zeros(2 * FLAGS * 17, dtype=torch.int64, device=self.device)
        self.launch(
            "change_kernel", 1, history.state, 1, 8, self.moved, self.moved.shape[1], empty, 0, empty, 0,
            empty.view(torch.float32), empty.view(torch.float32), empty, history.match_tables, history.q_table,
            history.info, history.match_tables.shape[1], 8, COPY=COPY,
        )  # fmt: skip
        self.steady(torch.zeros(WRITTEN, dtype=torch.int64, device=self.device), 1)
        self.apply(torch.zeros((1, 1), dtype=dtype, device=self.device), history, 0, Widths())

    def apply(self, logits: torch.Tensor, history: SharedHistory, n: int, widths: Widths) -> None:
        """The step's one ``step_kernel`` launch: cells, match state, then the first ``n`` rows' logits."""
        if self.scratch.shape[0] < history.rows or self.scratch.shape[1] < history.table_columns:
            shape = (max(history.rows, self.scratch.shape[0]), max(history.table_columns, self.scratch.shape[1]))
            self.scratch = torch.empty(shape, dtype=torch.float32, device=self.device)
        self.launch(
            "step_kernel", self._rows,
            history.state, history.rows, history.columns, self._values, self._stride, self._desc, self._rows,
            self._steady, self.moved, self.moved.shape[1], history.match_tables, history.q_table, history.info,
            history.match_tables.shape[1], history.table_columns, logits, logits.stride(0), logits.shape[1],
            self.scratch, self.scratch.shape[1], history.now, n, self._advanced, widths.dry, widths.ngram,
            widths.targets, widths.penalty, int(widths.dry_cut), int(widths.ngram_cut), int(widths.penalty_cut),
            self._looks[0], self._looks[1], BLOCK=self.block, COPY=COPY,
        )  # fmt: skip
