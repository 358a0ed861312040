"""Token history on the logits device, one slot per participating request, fed from vLLM's lists.

A batched processor keeps each request's tokens in a row ("slot") of a [slots, length] tensor on
the logits device and derives everything else there. Per step the host only reads each row's
newest token from vLLM's live output list (a few C-level list passes, no per-row Python in the
common case) and sends them in one copy; the processor then does a fixed number of tensor ops
over all rows. Anything unusual (a row just added, tokens dropped or regenerated, a placeholder
still present, several tokens at once) takes the general path, which rewrites what changed.
Batch moves and swaps only change which logits row a slot serves: no device copy.
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

if TYPE_CHECKING:
    from vllm.config import VllmConfig

_LAST = itemgetter(-1)
_BEFORE_LAST = itemgetter(-2)
_MIN_SLOTS = 8
_MIN_LENGTH = 64


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
    longest: int  # longest history among them (host-known, bounds the tensor widths)
    # Slots that gained exactly one token: (slots, the token's key, its position). In the fast path
    # this is every participating slot, in `slots` order.
    appended: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    rewritten: torch.Tensor | None = None  # slots whose history was rewritten: rebuild derived state
    fast: bool = False


def limits_of(vllm_config: VllmConfig) -> tuple[int | None, int | None]:
    """(max rows, max tokens per request) when the config says; the history never needs more."""
    scheduler = getattr(vllm_config, "scheduler_config", None)
    rows = getattr(scheduler, "max_num_seqs", None)
    length = getattr(vllm_config.model_config, "max_model_len", None)
    return (int(rows) if rows else None), (int(length) if length else None)


def grown(tensor: torch.Tensor, shape: tuple[int, ...], fill: float | int = 0) -> torch.Tensor:
    """A bigger copy of ``tensor`` (new cells hold ``fill``)."""
    out = torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


def scatter_min(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor) -> None:
    """``logits[rows[i], tokens[i, j]] = min(itself, values[i, j])`` for every i, j in one op.

    Every Governor processor only ever lowers a logit, and a token listed twice in a row gets the
    same value each time (or +inf where the cell is not meant to change), so min is exact and
    independent of order, on every device.
    """
    width = logits.shape[-1]
    flat = logits.view(-1) if logits.is_contiguous() else logits.contiguous().view(-1)
    target = (rows.unsqueeze(1) * width + tokens).flatten()
    flat.scatter_reduce_(0, target, values.flatten(), "amin")
    if flat.data_ptr() != logits.data_ptr():
        logits.copy_(flat.view_as(logits))


class BatchedLogitsProcessor(RowStateLogitsProcessor[SlotRow]):
    """Base of the batched processors: slots, the device token history and the per-step sync.

    Subclasses say which settings they read (``parse``), which prompt tokens they keep
    (``kept_prompt``), how a token is stored (``encode``), write per-slot settings for new
    requests (``configure``) and do their tensor work in ``penalize``.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.max_rows, self.max_len = limits_of(vllm_config)
        # Allocated on first use and grown by doubling up to the limits, so an engine where nobody
        # uses the processor holds no memory and one that does holds what its batch needs.
        self.history = torch.zeros((0, 0), dtype=torch.int64, device=self.device)
        self.length = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.distances = torch.zeros(0, dtype=torch.int64, device=self.device)  # 1, 2, … up to the length cap
        self._free_slots: list[int] = []
        self._next_slot = 0
        # Per participating row, in layout order, valid while the layout is unchanged.
        self.active: list[SlotRow] = []
        self._outputs: list[list[int]] = []
        self._consumed: list[int] = []
        self._last: list[int] = []
        self._expect: list[int] = []
        self._rows_t = self._slots_t = self.length
        self._slot_base: torch.Tensor | None = None
        self._slot_base_width = 0
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

    def encode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The value stored for each token (the token itself by default)."""
        return tokens

    @abstractmethod
    def configure(self, rows: list[SlotRow]) -> None:
        """Write the per-slot settings of requests that just got their slot."""

    def release_config(self, row: SlotRow) -> None:
        """Undo what ``configure`` acquired for the row (shared sets)."""
        return None

    def resize_state(self, slots: int, length: int) -> None:
        """Grow the subclass's per-slot tensors to ``slots`` rows (and ``length`` columns)."""
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

    # ---- the per-step sync ----------------------------------------------------------------------

    def _fast_step(self) -> Step | None:
        """Every row gained exactly one settled token and nothing before it changed: C-level list passes."""
        outputs = self._outputs
        lengths = list(map(len, outputs))
        if lengths != self._expect:
            return None
        newest = list(map(_LAST, outputs))
        if min(newest) < 0 or list(map(_BEFORE_LAST, outputs)) != self._last:
            return None
        self._ensure(self._next_slot, self._longest + 1)
        tokens = self.host_to_device(newest, torch.int64)
        slots = self._slots_t
        positions = self.length.index_select(0, slots)
        keys = self.encode(tokens, slots, positions)
        self.history[slots, positions] = keys
        self.length[slots] = positions + 1
        self._consumed = lengths
        self._last = newest
        self._expect = [n + 1 for n in lengths]
        self._longest += 1
        return Step(self._rows_t, slots, self._longest, (slots, keys, positions), None, fast=True)

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
        self._slot_base = None
        self.layout_changed = False
        self.layout_version += 1

    def per_slot(self, tensor: torch.Tensor) -> torch.Tensor:
        """The participating slots' rows of a per-slot tensor, in layout order (a view when contiguous)."""
        return tensor[: self.count] if self.slots_contiguous else tensor.index_select(0, self._slots_t)

    def slot_block(self, tensor: torch.Tensor, width: int) -> torch.Tensor:
        """``tensor[slot_i, :width]`` for the participating slots (a view when contiguous)."""
        if self.slots_contiguous:
            return tensor[: self.count, :width]
        return tensor[self._slots_t, :width]

    def write_per_slot(self, tensor: torch.Tensor, width: int, values: torch.Tensor) -> None:
        """``tensor[slot_i, :width] = values[i]`` for the participating slots."""
        if self.slots_contiguous:
            tensor[: self.count, :width] = values
        else:
            tensor[self._slots_t, :width] = values

    def read_history(self, positions: torch.Tensor) -> torch.Tensor:
        """``history[slot_i, positions[i, j]]`` for the participating slots; positions must be >= 0."""
        if self.slots_contiguous:
            return self.history[: self.count].gather(1, positions)
        if self._slot_base is None or self._slot_base_width != self.history.shape[1]:
            self._slot_base_width = self.history.shape[1]
            self._slot_base = (self._slots_t * self._slot_base_width).unsqueeze(1)
        return self.history.view(-1).take(positions + self._slot_base)

    def read_logits(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``logits[row_i, tokens[i, j]]`` for the participating rows."""
        if self.rows_contiguous:
            return logits[: self.count].gather(1, tokens)
        return logits[self._rows_t.unsqueeze(1), tokens]

    def lower_logits(self, logits: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor) -> None:
        """``logits[row_i, tokens[i, j]] = min(itself, values[i, j])`` in one op.

        Every Governor processor only ever lowers a logit, and a token listed twice in a row gets the
        same value each time (or +inf where the cell is not meant to change), so min is exact and
        independent of order, on every device.
        """
        if self.rows_contiguous:
            logits[: self.count].scatter_reduce_(1, tokens, values, "amin")
        else:
            scatter_min(logits, self._rows_t, tokens, values)

    def _general_step(self) -> Step:
        """Any mix of new rows, appends, drops and placeholders: rewrite what changed, per row on the host."""
        if self.layout_changed:
            self._relayout()
        fresh = [row for row in self.active if row.fresh]
        if fresh:
            self._ensure(self._next_slot, 0)
            self.configure(fresh)
        tokens: list[int] = []
        seg_slot: list[int] = []
        seg_start: list[int] = []
        seg_count: list[int] = []
        one: list[int] = []
        rewritten: list[int] = []
        longest = 0
        for i, row in enumerate(self.active):
            output = row.output
            n = settled_length(output)
            consumed = self._consumed[i]
            base = len(row.prompt)
            reset = True
            if row.fresh:
                start, new = 0, row.prompt + output[:n]
            elif n < consumed or (consumed and output[consumed - 1] != self._last[i]):
                start, new = base, output[:n]  # dropped or regenerated: rewrite the whole output
            else:
                start, new, reset = base + consumed, output[consumed:n], False
            if reset or len(new) > 1:
                rewritten.append(row.slot)
            elif new:
                one.append(row.slot)
            if reset or new:
                tokens += new
                seg_slot.append(row.slot)
                seg_start.append(start)
                seg_count.append(len(new))
            row.fresh = False
            self._consumed[i] = n
            self._last[i] = output[n - 1] if n else -1
            longest = max(longest, base + n)
        self._expect = [n + 1 if n else -1 for n in self._consumed]
        self._longest = longest
        self._ensure(self._next_slot, longest)
        step = Step(self._rows_t, self._slots_t, longest)
        if seg_slot:
            sizes = [len(tokens), len(seg_slot), len(seg_slot), len(seg_slot), len(one), len(rewritten)]
            flat = self.host_to_device(tokens + seg_slot + seg_start + seg_count + one + rewritten, torch.int64)
            new_t, slot_t, start_t, count_t, one_t, rewritten_t = flat.split(sizes)
            self._write(new_t, slot_t, start_t, count_t, len(tokens))
            if one:
                positions = self.length[one_t] - 1
                step.appended = (one_t, self.history[one_t, positions].long(), positions)
            step.rewritten = rewritten_t if rewritten else None
        return step

    def _write(self, tokens: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
               total: int) -> None:  # fmt: skip
        """history[slot, start + k] = encode(token) for each segment, and each slot's new length."""
        if total:
            # Which segment each token belongs to (searchsorted: repeat_interleave is slow on CPU).
            ends = torch.cumsum(counts, 0)
            index = torch.arange(total, device=self.device)
            segment = torch.searchsorted(ends, index, right=True)
            token_slot = slots[segment]
            positions = starts[segment] + index - (ends - counts)[segment]
            keys = self.encode(tokens, token_slot, positions)
            self.history[token_slot, positions] = keys
        self.length[slots] = starts + counts

    def _ensure(self, slots: int, length: int) -> None:
        """Grow the history (and the subclass's state) to hold ``slots`` slots of ``length`` tokens."""
        have_slots, have_length = self.history.shape
        if slots <= have_slots and length <= have_length:
            return
        new_slots, new_length = have_slots, have_length
        if slots > have_slots:
            new_slots = max(slots, _MIN_SLOTS, 2 * have_slots)
            if self.max_rows:
                new_slots = max(slots, min(new_slots, self.max_rows))
        if length > have_length:
            new_length = max(length, _MIN_LENGTH, 2 * have_length)
            if self.max_len:
                new_length = max(length, min(new_length, self.max_len))
        self.history = grown(self.history, (new_slots, new_length))
        self.length = grown(self.length, (new_slots,))
        self.distances = torch.arange(1, new_length + 2, dtype=torch.int64, device=self.device)
        self.resize_state(new_slots, new_length)
