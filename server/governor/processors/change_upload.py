"""A step where the batch changed: everything it writes, encoded on the host and sent in one copy.

Rows that gained one token are appended at ``now``; new rows and rows that must be rewritten get
their whole history, right-aligned at ``now``, and their match state rebuilt; moved rows are copied
and rows left without a request cleared; configs seen for the first time get their table rows.
All of it goes in one int64 buffer (table values as float32 pairs), one copy, then a fixed
sequence of device ops whatever the number of rows changed. The host work is numpy over the cells
plus a few Python calls per rewritten row.
"""

from __future__ import annotations

import numpy as np
import torch

from governor.processors.base import int64s
from governor.processors.batch_rows import BatchRows, Settled
from governor.processors.cells import NEVER
from governor.processors.request_configs import FLAGS, RequestConfigs, comparable
from governor.processors.shared_history import DRY_KEY, NGRAM_KEY, WRITTEN, SharedHistory, Widths
from governor.processors.uploads import Uploads


class _Layout:
    """Named regions of one int64 buffer."""

    def __init__(self) -> None:
        self.size = 0
        self.regions: dict[str, tuple[int, int]] = {}

    def add(self, name: str, count: int) -> None:
        self.regions[name] = (self.size, count)
        self.size += count

    def floats(self, name: str, count: int) -> None:
        """A region of ``count`` float32 (two per int64 slot)."""
        self.add(name, (count + 1) // 2)

    def host(self, buffer: np.ndarray, name: str) -> np.ndarray:
        start, count = self.regions[name]
        return buffer[start : start + count]

    def device(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        start, count = self.regions[name]
        return buffer[start : start + count]


def send_change(
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
    """Encode the changes, send them in one copy and apply them; ``history.now`` is the new column."""
    now, columns = history.now, history.table_columns  # tables serve histories this wide
    blanks = [row for row in blanks if row < history.rows]  # rows past the device ones are blank when made
    requests = batch.requests
    rewritten = np.array([row for row, _ in step.rewrite], dtype=np.int64)
    segments = [requests[row].prompt + requests[row].output[:count] for row, count in step.rewrite]
    lengths = np.array(list(map(len, segments)), dtype=np.int64)
    appended = step.appended_rows.shape[0]
    cells = appended + int(lengths.sum())
    look_dry, look_ngram = looks if rewritten.shape[0] else (0, 0)
    flag_rows = FLAGS * len(tables)
    layout = _Layout()
    for name, count in (("sources", len(moves[0])), ("targets", len(moves[1])), ("blanks", len(blanks)),
                        ("rows", cells), ("columns", cells), ("values", WRITTEN * cells),
                        ("rebuilt", rewritten.shape[0]), ("dry_suffix", rewritten.shape[0] * look_dry),
                        ("ngram_suffix", rewritten.shape[0] * look_ngram), ("tables", flag_rows),
                        ("info", 2 * flag_rows)):  # fmt: skip
        layout.add(name, count)
    layout.floats("match", 2 * flag_rows * (2 * columns + 1))
    layout.floats("q", flag_rows * columns)
    host = uploads.host(layout.size)

    def put(name: str, values: np.ndarray | list[int]) -> None:
        layout.host(host, name)[:] = values

    put("sources", moves[0])
    put("targets", moves[1])
    put("blanks", blanks)
    # Cells: the appended tokens at `now`, then each rewritten row's tokens ending at `now`.
    starts = np.cumsum(lengths) - lengths
    within = np.arange(cells - appended, dtype=np.int64) - np.repeat(starts, lengths)
    cell_rows = np.concatenate([step.appended_rows, np.repeat(rewritten, lengths)])
    put("rows", cell_rows)
    put("columns", np.concatenate([np.full(appended, now), now + 1 - np.repeat(lengths, lengths) + within]))
    tokens = np.concatenate([step.appended_tokens, *map(int64s, segments)])
    prompt_cells = within < np.repeat(batch.prompt_len[rewritten], lengths)
    in_prompt = np.concatenate([np.zeros(appended, dtype=bool), prompt_cells])
    values = layout.host(host, "values").reshape(WRITTEN, cells)
    configs.encode(tokens, batch.config[cell_rows], in_prompt, values)
    put("rebuilt", rewritten)
    for name, look, key in (("dry_suffix", look_dry, DRY_KEY), ("ngram_suffix", look_ngram, NGRAM_KEY)):
        if look:
            put(name, _suffixes(values[key, appended:], starts, lengths, look).ravel())
    _put_tables(configs, tables, columns, layout, host)

    staged = uploads.stage(layout.size)
    if moves[0]:
        history.move_rows(layout.device(staged, "sources"), layout.device(staged, "targets"))
    if blanks:
        history.blank_rows(layout.device(staged, "blanks"))
    if cells:
        staged_values = layout.device(staged, "values").view(WRITTEN, cells)
        history.write_cells(layout.device(staged, "rows"), layout.device(staged, "columns"), staged_values)
    if tables:
        match = layout.device(staged, "match").view(torch.float32)
        q = layout.device(staged, "q").view(torch.float32)
        history.write_tables(
            layout.device(staged, "tables"),
            match[: 2 * flag_rows * (2 * columns + 1)].view(2, flag_rows, 2 * columns + 1),
            q[: flag_rows * columns].view(flag_rows, columns),
            layout.device(staged, "info").view(flag_rows, 2),
        )
    if step.advanced:
        history.advance(batch.count, widths)
    rebuilt = layout.device(staged, "rebuilt")
    if look_dry and widths.dry:
        suffix = layout.device(staged, "dry_suffix").view(-1, look_dry)
        history.rebuild(rebuilt, suffix, DRY_KEY, widths.dry)
    if look_ngram and widths.ngram:
        suffix = layout.device(staged, "ngram_suffix").view(-1, look_ngram)
        history.rebuild(rebuilt, suffix, NGRAM_KEY, widths.ngram)


def _suffixes(keys: np.ndarray, starts: np.ndarray, lengths: np.ndarray, look: int) -> np.ndarray:
    """Each rewritten row's last ``look`` keys as compared, oldest first (``NEVER`` before its first token)."""
    at = (starts + lengths)[:, None] - look + np.arange(look)[None, :]
    inside = at >= starts[:, None]
    if not keys.shape[0]:
        return np.full(at.shape, NEVER, dtype=np.int64)
    return np.where(inside, comparable(keys[np.clip(at, 0, keys.shape[0] - 1)]), NEVER)


def _put_tables(configs: RequestConfigs, tables: list[int], columns: int, layout: _Layout, host: np.ndarray) -> None:
    """The table rows of configs seen for the first time (or of all, after the tables were reset)."""
    if not tables:
        return
    rows = FLAGS * len(tables)
    index = layout.host(host, "tables")
    match = layout.host(host, "match").view(np.float32)[: 2 * rows * (2 * columns + 1)].reshape(2, rows, -1)
    q = layout.host(host, "q").view(np.float32)[: rows * columns].reshape(rows, columns)
    info = layout.host(host, "info").reshape(rows, 2)
    for i, config in enumerate(tables):
        part = slice(FLAGS * i, FLAGS * (i + 1))
        index[part] = FLAGS * config + np.arange(FLAGS)
        match[:, part], q[part], info[part] = configs.table_rows(config, columns)
