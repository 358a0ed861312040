"""Match lengths against the newest token, kept per slot and column on the device.

``match[slot, c]`` is how many tokens, counting backwards, the text ending at column ``c`` has in
common with the text ending at the newest token (column ``now``), capped. DRY reads it as the
length of the repeat that the token after column ``c`` would extend; the no-repeat n-gram ban is
the same question with a fixed length (``>= n - 1``).

When a token ``x`` is appended (``now`` moves one column right), every entry either extends by one
or resets: ``match_new[c] = match_old[c - 1] + 1`` if ``history[c] == x`` else 0. Reading column
``c - 1`` while writing ``c`` would need a shift, so the state is two buffers used in turn: each
step reads one and writes the other, three int16 ops over [rows, width] after one comparison.
Only columns ``[now - width, now)`` are written; the column before them is either before every
row's first token (always 0: EMPTY matches nothing) or one whose value the readers cap away (DRY's
range, the n-gram window), so stale cells there do no harm. A slot whose history was rewritten is
recomputed from scratch (``rebuild``), which costs ``cap`` times more but happens once per request
or after dropped tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from governor.processors.cells import BREAK, EMPTY, NEVER, moved

if TYPE_CHECKING:
    from governor.processors.slots import BatchedLogitsProcessor, Step

# Cells (rows x width x lookback) one rebuild chunk may touch: bounds its temporary memory.
_REBUILD_CELLS = 1 << 22


def comparable(keys: torch.Tensor) -> torch.Tensor:
    """Keys as the newest token of a suffix: a breaker (or an empty cell) matches nothing."""
    return torch.where((keys == BREAK) | (keys == EMPTY), NEVER, keys)


class SuffixMatch:
    """The two [slots, columns] int16 match buffers and their updates."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers = [torch.zeros((0, 0), dtype=torch.int16, device=device) for _ in range(2)]
        self.current = 0

    def resize(self, slots: int, columns: int, src: int, dst: int, count: int) -> None:
        """New shape, with the current buffer's columns ``src:src+count`` moved to ``dst``."""
        shape = (slots, columns)
        self.buffers[self.current] = moved(self.buffers[self.current], shape, src, dst, count)
        self.buffers[1 - self.current] = torch.zeros(shape, dtype=torch.int16, device=self.device)

    def update(self, owner: BatchedLogitsProcessor, step: Step, width: int, cap: int) -> torch.Tensor | None:
        """Bring the matches to ``step``; the participating rows' ``[:, now - width : now]`` (None if empty)."""
        now, lo = step.now, step.now - width
        old = self.buffers[self.current]
        if step.advanced:
            self.current = 1 - self.current
        new = self.buffers[self.current]
        history = owner.history
        if step.fast:
            if width <= 0:
                return None
            assert step.appended is not None  # the fast path appends to every row
            same = owner.window(history, lo, now) == comparable(step.appended[1]).unsqueeze(1)
            if owner.slots_contiguous:
                out = new[: owner.count, lo:now]
                torch.add(old[: owner.count, lo - 1 : now - 1], 1, out=out)
                return out.clamp_max_(cap).mul_(same)
            match = old[owner._slots_t, lo - 1 : now - 1].add(1).clamp_max_(cap).mul_(same)
            new[owner._slots_t, lo:now] = match
            return match
        if step.appended is not None and width > 0:
            slots, keys = step.appended
            same = history[slots, lo:now] == comparable(keys).unsqueeze(1)
            new[slots, lo:now] = old[slots, lo - 1 : now - 1].add(1).clamp_max_(cap).mul_(same)
        if step.rewritten is not None:
            self.buffers[0][step.rewritten] = 0
            self.buffers[1][step.rewritten] = 0
            if width > 0:
                self.rebuild(history, step.rewritten, now, width, cap)
        return owner.window(new, lo, now) if width > 0 else None

    def rebuild(self, history: torch.Tensor, slots: torch.Tensor, now: int, width: int, cap: int) -> None:
        """Recompute the slots' matches over columns ``[now - width, now)`` from their history."""
        if cap <= 0:
            return
        steps = torch.arange(cap, device=self.device)
        columns = torch.arange(now - width, now, device=self.device)
        earlier_at = (columns.view(1, -1, 1) - steps.view(1, 1, -1)).clamp(min=0)  # [1, width, cap]
        suffix_at = (now - steps).clamp(min=0)
        chunk = max(1, _REBUILD_CELLS // (width * cap))
        target = self.buffers[self.current]
        for first in range(0, slots.shape[0], chunk):
            part = slots[first : first + chunk]
            suffix = comparable(history[part.unsqueeze(1), suffix_at])  # newest first
            earlier = history[part.view(-1, 1, 1), earlier_at]
            run = (earlier == suffix.unsqueeze(1)).to(torch.int16).cumprod(2).sum(2)
            target[part, now - width : now] = run.clamp_(max=cap).to(torch.int16)
