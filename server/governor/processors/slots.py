"""Token history on the logits device, one slot per participating request, fed from vLLM's lists.

A batched processor keeps each request's tokens in a row ("slot") of a [slots, columns] tensor on
the logits device and derives everything else there. The rows are right-aligned: every active
request's newest token sits in the same column, ``now``, so "the last W tokens of every row" is
a plain slice ``[:, now - W + 1 : now + 1]``, never a gather; cells before a request's first token
hold ``EMPTY``. In the common step every row gains one token: ``now`` moves one column right and
the host sends the newest tokens in one copy (a few C-level passes over vLLM's output lists, no
per-row Python). Anything unusual (a row just added, tokens dropped or regenerated, a placeholder
still present, several tokens at once) takes the general path, which rewrites those rows whole,
right-aligned again. When ``now`` reaches the last column the rows are moved back to the left
(one copy of what is still needed, every ~``longest`` steps). Batch moves and swaps only change
which logits row a slot serves: no device copy.

Three planes per cell, written once per token: the key the subclass matches on (int32), the
logits column to touch (int64, 0 where there is none) and ``alive`` (1.0, or 0.0 where there is
no logit to touch: a float, because multiplying by it is ~10x cheaper on CPU than a masked fill).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate

from governor.processors.base import RowStateLogitsProcessor, settled_length
from governor.processors.cells import EMPTY, SCATTERED_VOCAB, grown, moved, outside_keys, scatter_min

if TYPE_CHECKING:
    from vllm.config import VllmConfig

_LAST = itemgetter(-1)
_BEFORE_LAST = itemgetter(-2)
_MIN_SLOTS = 8
_MIN_COLUMNS = 64


@dataclass(slots=True)
class SlotRow:
    """One participating request: its parsed settings, the host lists it reads, its device slot."""

    config: Any
    prompt: list[int]  # the prompt tokens this processor keeps in history ([] when only output counts)
    output: list[int]  # vLLM's live output list
    slot: int
    consumed: int = 0  # output tokens already in the device history
    last: int = -1  # output[consumed - 1] when it was written
    fresh: bool = True  # the slot still holds a previous owner's state
    token_set: int = -1  # the row's TokenSets id, where the processor has one


@dataclass(slots=True)
class Step:
    """What changed on the device this step, for the processor's own state and its logits pass."""

    rows: torch.Tensor  # logits row of each participating request
    slots: torch.Tensor  # its slot, same order
    longest: int  # longest history among them (host-known, bounds the slice widths)
    now: int  # the column of every participating row's newest token
    advanced: bool  # ``now`` moved one column: derived state indexed by column must follow
    # Slots that gained exactly one token and its key. In the fast path this is every
    # participating slot, in `slots` order.
    appended: tuple[torch.Tensor, torch.Tensor] | None = None
    rewritten: torch.Tensor | None = None  # slots whose history was rewritten: rebuild derived state
    fast: bool = False


def limits_of(vllm_config: VllmConfig) -> tuple[int | None, int | None]:
    """(max rows, max tokens per request) when the config says; the history never needs more."""
    scheduler = getattr(vllm_config, "scheduler_config", None)
    rows = getattr(scheduler, "max_num_seqs", None)
    length = getattr(vllm_config.model_config, "max_model_len", None)
    return (int(rows) if rows else None), (int(length) if length else None)


class BatchedLogitsProcessor(RowStateLogitsProcessor[SlotRow]):
    """Base of the batched processors: slots, the aligned device history and the per-step sync.

    Subclasses say which settings they read (``parse``), which prompt tokens they keep
    (``kept_prompt``), how a token is stored (``encode``), write per-slot settings for new
    requests (``configure``) and do their tensor work in ``penalize``.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.max_rows, self.max_len = limits_of(vllm_config)
        # Allocated on first use and grown by doubling, so an engine where nobody uses the
        # processor holds no memory and one that does holds what its batch needs.
        self.history = torch.full((0, 0), EMPTY, dtype=torch.int32, device=self.device)
        self.index = torch.zeros((0, 0), dtype=torch.int64, device=self.device)
        self.alive = torch.zeros((0, 0), dtype=torch.float32, device=self.device)
        self.columns = torch.zeros(0, dtype=torch.int32, device=self.device)  # 0, 1, 2, … per history column
        self.now = 0
        self._free_slots: list[int] = []
        self._next_slot = 0
        # Per participating row, in layout order, valid while the layout is unchanged.
        self.active: list[SlotRow] = []
        self._outputs: list[list[int]] = []
        self._consumed: list[int] = []
        self._last: list[int] = []
        self._expect: list[int] = []
        self._rows_t = self._slots_t = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.count = 0
        self.slots_contiguous = self.rows_contiguous = False
        self._longest = 0
        self.layout_version = 0

    # ---- subclass interface -------------------------------------------------------------------

    @abstractmethod
    def parse(self, extra_args: dict[str, Any] | None) -> Any:
        """The request's settings, or None when it does not use this processor."""

    def kept_prompt(self, config: Any, prompt: list[int]) -> list[int]:
        """The prompt tokens that belong in the history (all by default)."""
        return prompt

    def encode(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The int32 key stored for each token: the id, or ``OUTSIDE_BASE - k`` for id vocab + k
        (a client's tokenizer: such ids still match each other, but have no logit)."""
        return outside_keys(tokens, self.vocab_size)

    def encode_newest(self, tokens: torch.Tensor) -> torch.Tensor:
        """``encode`` for the fast path: one token per participating slot, in layout order, every
        id known to be inside the vocabulary (fewer ops: at 1,024 rows each costs ~10 us on CPU)."""
        return tokens.to(torch.int32)

    @abstractmethod
    def configure(self, rows: list[SlotRow]) -> None:
        """Write the per-slot settings of requests that just got their slot."""

    def release_config(self, row: SlotRow) -> None:
        """Undo what ``configure`` acquired for the row (shared sets)."""
        return None

    def resize_state(self, slots: int, columns: int, src: int, dst: int, count: int) -> None:
        """Reshape the subclass's per-slot state to ``slots`` rows (and ``columns`` columns, where
        columns ``src:src+count`` move to ``dst``); see ``moved``."""
        return None

    @abstractmethod
    def penalize(self, logits: torch.Tensor, step: Step) -> None:
        """Update derived state for ``step`` and lower the logits of the participating rows."""

    # ---- vLLM interface -----------------------------------------------------------------------

    def new_row(self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> SlotRow | None:
        """A slot for a request that uses this processor (its device state is written at the next apply)."""
        config = self.parse(params.extra_args)
        if config is None:
            return None
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = self._next_slot
            self._next_slot += 1
        return SlotRow(config, self.kept_prompt(config, prompt_ids or []), output_ids, slot)

    def release_row(self, row: SlotRow) -> None:
        self._free_slots.append(row.slot)
        if not row.fresh:
            self.release_config(row)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None and not self.layout_changed:
            # The per-layout lists hold the truth about each row's progress; hand it back to the rows.
            for row, consumed, last in zip(self.active, self._consumed, self._last, strict=True):
                row.consumed, row.last = consumed, last
        super().update_state(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Fold the step's new tokens into the device history, then let the subclass act."""
        if not self.rows:
            return logits
        step = self._fast_step() if not self.layout_changed else None
        if step is None:
            step = self._general_step()
        if step.longest:
            self.penalize(logits, step)
        return logits

    # ---- views of the participating rows --------------------------------------------------------

    def per_slot(self, tensor: torch.Tensor) -> torch.Tensor:
        """The participating slots' rows of a per-slot tensor, in layout order (a view when contiguous)."""
        return tensor[: self.count] if self.slots_contiguous else tensor.index_select(0, self._slots_t)

    def window(self, tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``tensor[slot_i, start:stop]`` for the participating slots (a view when contiguous)."""
        if self.slots_contiguous:
            return tensor[: self.count, start:stop]
        return tensor[self._slots_t, start:stop]

    def targets(self, logits: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits column, alive) of the participating rows' cells ``start:stop``.

        The columns are copied contiguous: gathers and scatters with a strided index are ~3x slower
        on CPU. Where the window already was contiguous they are views: never write to them.
        Logits narrower than the vocabulary (rare): ids past them have nothing to lower.
        """
        tokens, alive = self.window(self.index, start, stop).contiguous(), self.window(self.alive, start, stop)
        width = logits.shape[-1]
        if width >= self.vocab_size:
            return tokens, alive
        return tokens.clamp(max=width - 1), alive * (tokens < width)

    def cache_friendly(self, logits: torch.Tensor, tokens: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
        """On CPU with a wide vocabulary, cells ``hit`` leaves at 0 (nothing to lower) point at column 0:
        the gather and scatter then stay in cache (~2x at 1k rows x 2k context x 49k vocab). Not on a
        GPU, where thousands of atomics on one address per row would serialise. Not in place: a one-row
        window is a view of the index plane."""
        if self.device.type == "cpu" and logits.shape[-1] >= SCATTERED_VOCAB:
            return tokens * (hit > 0)
        return tokens

    def read_logits(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``logits[row_i, tokens[i, j]]`` for the participating rows."""
        if self.rows_contiguous:
            return logits[: self.count].gather(1, tokens)
        return logits[self._rows_t.unsqueeze(1), tokens]

    def lower_logits(self, logits: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor) -> None:
        """``logits[row_i, tokens[i, j]] = min(itself, values[i, j])`` in one op (see ``scatter_min``)."""
        if self.rows_contiguous:
            logits[: self.count].scatter_reduce_(1, tokens, values, "amin")
        else:
            scatter_min(logits, self._rows_t, tokens, values)

    # ---- the per-step sync ----------------------------------------------------------------------

    def _fast_step(self) -> Step | None:
        """Every row gained exactly one settled token and nothing before it changed: C-level list passes."""
        outputs = self._outputs
        lengths = list(map(len, outputs))
        if lengths != self._expect or self.now + 1 >= self.history.shape[1]:
            return None
        newest = list(map(_LAST, outputs))
        if min(newest) < 0 or max(newest) >= self.vocab_size or list(map(_BEFORE_LAST, outputs)) != self._last:
            return None
        self.now += 1
        slots = self._slots_t
        keys = self.encode_newest(self.host_to_device(newest, torch.int64))
        self._put_column(keys)
        self._consumed = lengths
        self._last = newest
        self._expect = [n + 1 for n in lengths]
        self._longest += 1
        return Step(self._rows_t, slots, self._longest, self.now, True, (slots, keys), None, fast=True)

    def _put_column(self, keys: torch.Tensor) -> None:
        now, index = self.now, keys.clamp(min=0).long()
        alive = (keys >= 0).float()
        if self.slots_contiguous:
            self.history[: self.count, now] = keys
            self.index[: self.count, now] = index
            self.alive[: self.count, now] = alive
        else:
            slots = self._slots_t
            self.history[slots, now] = keys
            self.index[slots, now] = index
            self.alive[slots, now] = alive

    def _relayout(self) -> None:
        # Slot order; when the slots (and rows) are exactly 0..n-1, as in a batch without churn,
        # per-slot reads are slices and the logits are updated along their rows, without index copies.
        pairs = sorted(self.rows.items(), key=lambda item: item[1].slot)
        self.active = [row for _, row in pairs]
        rows = [index for index, _ in pairs]
        slots = [row.slot for row in self.active]
        self.count = len(slots)
        self.slots_contiguous = slots == list(range(self.count))
        self.rows_contiguous = rows == list(range(self.count))
        self._outputs = [row.output for row in self.active]
        self._consumed = [row.consumed for row in self.active]
        self._last = [row.last for row in self.active]
        both = self.host_to_device(rows + slots, torch.int64)
        self._rows_t, self._slots_t = both[: self.count], both[self.count :]
        self.layout_changed = False
        self.layout_version += 1

    def _general_step(self) -> Step:
        """Any mix of new rows, appends, drops and placeholders: rows that gained one token are
        appended, the rest are rewritten whole, right-aligned at the new ``now``."""
        if self.layout_changed:
            self._relayout()
        fresh = [row for row in self.active if row.fresh]
        if fresh:
            self._ensure(self._next_slot, 0)
            self.configure(fresh)
        one_slots: list[int] = []
        one_tokens: list[int] = []
        stay: list[tuple[SlotRow, int]] = []
        rewrite: list[tuple[SlotRow, int]] = []
        longest = 0
        for i, row in enumerate(self.active):
            output = row.output
            n = settled_length(output)
            consumed = self._consumed[i]
            if row.fresh or n < consumed or (consumed and output[consumed - 1] != self._last[i]):
                rewrite.append((row, n))  # new, or tokens dropped or regenerated
            elif n == consumed + 1:
                one_slots.append(row.slot)
                one_tokens.append(output[n - 1])
            elif n == consumed:
                stay.append((row, n))
            else:
                rewrite.append((row, n))
            row.fresh = False
            self._consumed[i] = n
            self._last[i] = output[n - 1] if n else -1
            longest = max(longest, len(row.prompt) + n)
        advanced = bool(one_slots)
        if advanced:
            rewrite += stay  # their newest token must move to the new column too
        self._expect = [n + 1 if n else -1 for n in self._consumed]
        self._longest = longest
        # One column left of every row stays EMPTY, so "the column before the window" always exists.
        now = self.now + advanced
        if now < longest + 1 or now >= self.history.shape[1] or self.history.shape[0] < self._next_slot:
            now = self._realign(longest, advanced)
        self.now = now
        step = Step(self._rows_t, self._slots_t, longest, now, advanced)
        if one_slots:
            flat = self.host_to_device(one_slots + one_tokens, torch.int64)
            slots, tokens = flat[: len(one_slots)], flat[len(one_slots) :]
            keys = self.encode(tokens, slots)
            self.history[slots, now] = keys
            self.index[slots, now] = keys.clamp(min=0).long()
            self.alive[slots, now] = (keys >= 0).float()
            step.appended = (slots, keys)
        if rewrite:
            step.rewritten = self._rewrite(rewrite, now)
        return step

    def _rewrite(self, rows: list[tuple[SlotRow, int]], now: int) -> torch.Tensor:
        """Write each row's whole history (prompt + settled output), ending at column ``now``."""
        tokens: list[int] = []
        slots: list[int] = []
        columns: list[int] = []
        for row, n in rows:
            new = row.prompt + row.output[:n]
            tokens += new
            slots += [row.slot] * len(new)
            columns += range(now - len(new) + 1, now + 1)
        which = [row.slot for row, _ in rows]
        flat = self.host_to_device(which + tokens + slots + columns, torch.int64)
        which_t, tokens_t, slots_t, columns_t = flat.split([len(which), len(tokens), len(tokens), len(tokens)])
        self.history[which_t] = EMPTY
        self.index[which_t] = 0
        self.alive[which_t] = 0.0
        if tokens:
            keys = self.encode(tokens_t, slots_t)
            self.history[slots_t, columns_t] = keys
            self.index[slots_t, columns_t] = keys.clamp(min=0).long()
            self.alive[slots_t, columns_t] = (keys >= 0).float()
        return which_t

    def _realign(self, longest: int, advanced: bool) -> int:
        """Move every row so that the column holding the newest token is ``longest + 1`` (before
        this step's appends), growing the slots and columns as needed; returns the new ``now``."""
        slots = self._ensure_slots(self._next_slot)
        target = longest + 1
        columns = max(self.history.shape[1], 2 * (target + 2), _MIN_COLUMNS)
        count = min(self.now + 1, target + 1) if self.history.numel() else 0
        src, dst = self.now - count + 1, target - count + 1
        shape = (slots, columns)
        self.history = moved(self.history, shape, src, dst, count, EMPTY)
        self.index = moved(self.index, shape, src, dst, count, 0)
        self.alive = moved(self.alive, shape, src, dst, count, 0.0)
        if columns > self.columns.shape[0]:
            self.columns = torch.arange(columns, dtype=torch.int32, device=self.device)
        self.resize_state(slots, columns, src, dst, count)
        return target + advanced

    def _ensure_slots(self, slots: int) -> int:
        have = self.history.shape[0]
        if slots <= have:
            return have
        new = max(slots, _MIN_SLOTS, 2 * have)
        if self.max_rows:
            new = max(slots, min(new, self.max_rows))
        return new

    def _ensure(self, slots: int, columns: int) -> None:
        """Grow the slots (per-slot settings written by ``configure`` need their row)."""
        if slots > self.history.shape[0]:
            self._grow_rows(self._ensure_slots(slots))

    def _grow_rows(self, slots: int) -> None:
        columns = self.history.shape[1]
        self.history = grown(self.history, (slots, columns), EMPTY)
        self.index = grown(self.index, (slots, columns), 0)
        self.alive = grown(self.alive, (slots, columns), 0.0)
        self.resize_state(slots, columns, 0, 0, columns)
